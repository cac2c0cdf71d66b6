"""The unlearning loop, top to bottom.

    loss = forget_weight · L_objective(D_forget) + retain_weight · L_retain(D_retain)

`train` reads as its stages: check the inputs (before any file is written), lock the run folder, set up
(reference copy, optimizer, profiler), resume, then per step: learning rate, profile G-effects, the
micro-steps (with the stop on a NaN loss), evaluate, log, checkpoint.

Losses come from the fused functions on the decoder's final hidden states and the LM head (the
model's logits are never formed). Reference log-probabilities (TNPO, WTNPO, NPO) come from a frozen
copy of the *starting* model, once per sample. Every ``checkpoint_every`` steps the model, optimizer,
RNG state, G-effect history and the settings that shape the run are written atomically; a rerun with the
same ``out_dir`` and settings resumes from there and, because batches and the learning rate are functions
of the step number, ends bit-identical to a run that was never interrupted (`resume` says when other
settings may continue a checkpoint).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import hf
from ..backends.registry import check_backend
from ..geffect import GEffectHistory, GEffectProfiler
from ..objectives import OBJECTIVES, unlearning_loss
from ..retain import kl_loss
from .checkpoint import (CHECKPOINT, atomic_write_json, atomic_write_text, load_checkpoint, remove_orphans,
                         save_checkpoint)
from .frozen_model import RefLogprobCache, frozen_copy
from .presets import resolve as resolve_preset
from .resume import differences, run_settings, should_resume
from .run_lock import run_lock
from .schedule import batch_indices, warmup_linear_decay
from .train_config import TrainConfig

METRICS = "metrics.jsonl"
GEFFECTS = "geffects.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    steps: int
    metrics: list[dict] = field(default_factory=list)
    geffects: object = None  # GEffectHistory when G-effects were recorded
    resumed_from: int = 0
    model: object = None  # the trained model (the caller's, trained in place; a sharded run's own)


@dataclass
class _Run:
    """What the stages share: the model and its optimizer, the data, the profiler and the run folder."""
    model: torch.nn.Module
    forget: object
    retain: object
    config: TrainConfig
    device: torch.device
    autocast: object
    reference: torch.nn.Module | None
    ref_cache: RefLogprobCache | None
    params: list
    optimizer: torch.optim.Optimizer
    lr_factor: object  # step -> factor of config.lr
    settings: dict  # what shapes the run (`resume.run_settings`), stored in every checkpoint
    profiler: object = None
    history: object = None
    out: Path | None = None
    start: int = 0  # the step the loop starts from (the checkpoint's, when resuming)
    metrics: list = field(default_factory=list)
    last_good: int | None = None  # the step of the last checkpoint written or resumed from
    setting_changes: list = field(default_factory=list)  # settings changed by resume=True: {"step", "before"}

    def forget_batch(self, micro):
        idx = batch_indices(len(self.forget), self.config.batch_size, self.config.seed, micro)
        batch = _to(self.forget.batch(idx), self.device)
        ref = self.ref_cache.batch(idx, batch["input_ids"].shape[1], self.device) if self.ref_cache else None
        return batch, ref

    def retain_batch(self, micro):
        idx = batch_indices(len(self.retain), self.config.batch_size, self.config.seed + 1, micro)
        return _to(self.retain.batch(idx), self.device)

    # the losses of a micro-step (a sharded run's are its global batch's: `distributed`)
    def objective_loss(self, name, batch, ref_logprobs=None, hparams=None):
        return _objective_loss(name, self.model, batch, self.config, ref_logprobs, hparams)

    def kl_retain_loss(self, batch):
        return _kl_retain_loss(self.model, self.reference, batch, self.config)


def train(model, forget, retain, config: TrainConfig, *, evaluate=None, resume: bool | None = None
          ) -> TrainResult:
    """Run ``config.steps`` optimizer steps on ``model`` (in place) and return the logged metrics.

    Args:
        model: a Hugging Face causal LM in its *starting* state (the reference copy is taken from it,
            also when resuming: the checkpoint's weights are loaded afterwards).
        forget, retain: `EncodedSet`s (``retain`` may be None with ``retain_objective="none"``).
        evaluate: optional ``evaluate(model) -> dict`` called every ``config.eval_every`` steps; its
            numbers go into the metrics log.
        resume: what to do with a checkpoint in ``config.out_dir``. None (default): continue it when it was
            trained with the same settings, ResumeMismatch otherwise; True: continue it under the new
            settings; False: start over (the folder's checkpoint, log, G-effects and model are replaced).
    Raises RunFolderBusy when another process is training into ``config.out_dir``.
    """
    check_inputs(model, forget, retain, config)
    config = resolve_preset(config, model, len(forget))
    with run_lock(config.out_dir):  # one writer per run folder, released however the run ends
        run = _setup(model, forget, retain, config)
        _resume(run, resume)
        _loop(run, evaluate)
        return _finish(run)


def check_resumable(model, forget, retain, config: TrainConfig, resume: bool | None = None) -> None:
    """Raise now what `train` would raise on meeting ``config.out_dir``'s checkpoint (CheckpointError,
    ResumeMismatch): a command that trains several runs checks them all before it starts the first."""
    config = resolve_preset(config, model, len(forget))
    if config.out_dir is not None and resume is not False:
        should_resume(Path(config.out_dir), load_checkpoint(config.out_dir), run_settings(config, forget, retain),
                      resume)


def _loop(run: _Run, evaluate):
    config = run.config
    run.model.train()
    # disable=None: a bar on a terminal, none when the output is a log file or a pipe
    bar = tqdm(range(run.start, config.steps), initial=run.start, total=config.steps, desc=config.objective,
               disable=None if config.progress else True, leave=False)
    for step in bar:
        number = step + 1  # steps are counted from 1: "step 5" is the fifth update
        record = {"step": number, "lr": _set_lr(run, step)}
        if run.profiler is not None and step % config.geffect_every == 0:
            record.update(_profile(run, step, number))
        record.update(_optimizer_step(run, step, number))
        if evaluate is not None and config.eval_every and number % config.eval_every == 0:
            record.update(_evaluate(run, evaluate))
        _log(run, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if run.out is not None and (number % config.checkpoint_every == 0 or number == config.steps):
            _checkpoint(run, number)
    bar.close()


# -- setup and resume ----------------------------------------------------------------------------------

def check_inputs(model, forget, retain, config):
    """Everything `train` can check before it writes a file: the data and the backend on the model's device
    (`TrainConfig` checked the settings when it was made)."""
    if len(forget) == 0:
        raise ValueError("the forget set is empty")
    if config.uses_retain and (retain is None or len(retain) == 0):
        raise ValueError(f"retain objective {config.retain_objective!r} needs a non-empty retain set")
    check_backend(config.backend, next(model.parameters()).device)


def _setup(model, forget, retain, config) -> _Run:
    """The reference copy and its cache, then what every run sets up (`new_run`)."""
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    needs_ref = OBJECTIVES[config.objective].needs_ref
    reference = frozen_copy(model) if needs_ref or (config.uses_retain and config.retain_objective == "kl") \
        else None
    return new_run(_Run, model, forget, retain, config, reference=reference,
                   ref_cache=RefLogprobCache(reference, forget, backend=config.backend) if needs_ref else None,
                   autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"))


def new_run(run_type, model, forget, retain, config, *, reference, ref_cache, autocast) -> _Run:
    """A ``run_type`` (`_Run` or a subclass) over ``model``: the optimizer over its trainable parameters, the LR
    schedule, the settings a checkpoint records, the run folder and the G-effect profiler."""
    params = [p for p in model.parameters() if p.requires_grad]
    run = run_type(
        model=model, forget=forget, retain=retain, config=config, device=next(model.parameters()).device,
        autocast=autocast, reference=reference, ref_cache=ref_cache, params=params,
        optimizer=torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
        lr_factor=warmup_linear_decay(config.warmup_steps, config.steps),
        settings=run_settings(config, forget, retain), out=Path(config.out_dir) if config.out_dir else None)
    if config.geffect_every:
        run.profiler = GEffectProfiler(model, groups=config.geffect_groups)
        run.history = GEffectHistory(config.objective)
    return run


def _resume(run: _Run, resume: bool | None):
    """Clear what a killed run left, then continue the folder's checkpoint (`should_resume`) or start over;
    the metrics log is trimmed to the checkpoint's step (later lines are steps that run again)."""
    if run.out is None:
        return
    remove_orphans(run.out)
    if resume is False:
        for name in (CHECKPOINT, METRICS, GEFFECTS):
            (run.out / name).unlink(missing_ok=True)
        shutil.rmtree(run.out / "model", ignore_errors=True)
    state = load_checkpoint(run.out)
    if should_resume(run.out, state, run.settings, resume):
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        run.start = run.last_good = state["step"]
        run.setting_changes = list(state.get("setting_changes", []))
        changed = differences(state["settings"], run.settings)
        if changed:
            run.setting_changes.append({"step": run.start, "before": {k: old for k, (old, _) in changed.items()}})
        if run.history is not None and state.get("geffects") is not None:
            run.history = GEffectHistory.from_dict(state["geffects"])
    config = run.config.to_dict()
    if run.setting_changes:  # what the weights were also trained with (resume=True with other settings)
        config["setting_changes"] = run.setting_changes
    atomic_write_json(run.out / "config.json", config)
    run.metrics = _read_metrics(run.out / METRICS, run.start)
    atomic_write_text(run.out / METRICS, "".join(json.dumps(m) + "\n" for m in run.metrics))


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Logged lines of steps ≤ ``up_to_step`` (what the checkpoint covers); a torn last line is dropped."""
    lines = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= up_to_step:
                lines.append(record)
    return lines


# -- one step --------------------------------------------------------------------------------------------

def _set_lr(run: _Run, step) -> float:
    """The step's learning rate, a function of the step and the settings alone (nothing to restore on resume)."""
    lr = run.config.lr * run.lr_factor(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _profile(run: _Run, step, number) -> dict:
    """G-effects at the parameters this step's update starts from, on the step's first micro-batches."""
    config = run.config
    f_batch, f_ref = run.forget_batch(step * config.grad_accum)
    r_batch = run.retain_batch(step * config.grad_accum) if run.retain is not None else None
    with run.autocast:
        result = run.profiler.measure_unlearning(
            config.objective, f_batch, r_batch, ref_logprobs=f_ref,
            retain_objective=config.retain_objective if config.uses_retain else None, **config.hparams)
    run.history.record(number, result)
    return {"e_forget": float(result.total["forget"]), "e_retain": float(result.total.get("retain", 0.0))}


def _optimizer_step(run: _Run, step, number) -> dict:
    """``grad_accum`` micro-steps, clipping, one AdamW update; TrainingDiverged on a NaN or inf loss."""
    config = run.config
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "forget_loss": 0.0, "retain_loss": 0.0}
    for k in range(config.grad_accum):
        try:
            losses = _micro_step_losses(run, step * config.grad_accum + k)
        except _NonFinite as err:
            where = (f"the last good checkpoint is step {run.last_good} in {run.out / CHECKPOINT}" if run.last_good
                     else "no checkpoint was written")
            raise TrainingDiverged(f"{err} at step {number}; stopped, {where}") from None
        (losses["loss"] / config.grad_accum).backward()
        for key, value in losses.items():
            sums[key] += float(value.detach()) / config.grad_accum
    norm = torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm or float("inf"))
    run.optimizer.step()
    return {**sums, "grad_norm": float(norm), "seconds": time.perf_counter() - t0}


class _NonFinite(ArithmeticError):
    pass


def _micro_step_losses(run: _Run, micro) -> dict:
    """The weighted total and its two terms on micro-batch ``micro`` (forward only)."""
    config = run.config
    f_batch, f_ref = run.forget_batch(micro)
    with run.autocast:
        forget_loss = run.objective_loss(config.objective, f_batch, f_ref, config.hparams)
        retain_loss = torch.zeros((), device=run.device)
        if config.uses_retain and config.retain_objective == "nll":
            retain_loss = run.objective_loss("nll", run.retain_batch(micro))
        elif config.uses_retain:
            retain_loss = run.kl_retain_loss(run.retain_batch(micro))
        loss = config.forget_weight * forget_loss + config.retain_weight * retain_loss
    if not torch.isfinite(loss):
        raise _NonFinite(f"the loss is {loss.item()}")
    return {"loss": loss, "forget_loss": forget_loss, "retain_loss": retain_loss}


def _head(model, batch):
    x = hf.head_inputs(model, batch)
    if not bool(torch.isfinite(x.hidden).all()):
        raise _NonFinite("the hidden states hold NaN or inf")
    # under autocast the decoder may hand back another dtype than the head's; the kernels need one
    return x._replace(hidden=x.hidden.to(x.weight.dtype))


def _objective_loss(name, model, batch, config, ref_logprobs=None, hparams=None):
    x = _head(model, batch)
    return unlearning_loss(name, x.hidden, x.weight, x.labels, ref_logprobs=ref_logprobs, **x.as_kwargs(),
                           backend=config.backend, **(hparams or {}))


def _kl_retain_loss(model, reference, batch, config):
    x = _head(model, batch)
    with torch.no_grad():
        r = _head(reference, batch)
    # batchmean: every position counts, prompt and padding too, so no shift drops the last one
    return kl_loss(x.hidden, x.weight, r.hidden, r.weight, x.labels, bias=x.bias, ref_bias=r.bias, softcap=x.softcap,
                   shift=config.kl_normalization == "tokens", backend=config.backend, reduction=config.kl_normalization)


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _evaluate(run: _Run, evaluate) -> dict:
    run.model.eval()
    try:
        return evaluate(run.model)
    finally:
        run.model.train()


# -- logging, checkpoints, the end -----------------------------------------------------------------------

def _log(run: _Run, record: dict):
    run.metrics.append(record)
    if run.out is not None:
        with open(run.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _checkpoint(run: _Run, number):
    # the history rides in the checkpoint so that both always describe the same step
    save_checkpoint(run.out, {
        "step": number, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "geffects": run.history.to_dict() if run.history is not None else None,
        "settings": run.settings, "setting_changes": run.setting_changes,
    })
    run.last_good = number


def _finish(run: _Run) -> TrainResult:
    run.model.eval()
    if run.out is not None:
        _save_model(run.model, run.out)
        if run.history is not None:
            atomic_write_json(run.out / GEFFECTS, run.history.to_dict())
    return TrainResult(steps=run.config.steps, metrics=run.metrics, geffects=run.history, resumed_from=run.start,
                       model=run.model)


def _save_model(model, out_dir: Path):
    tmp, final = out_dir / ".model.tmp", out_dir / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
