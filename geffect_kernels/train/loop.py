"""The unlearning loop, top to bottom.

    loss = forget_weight · L_objective(D_forget) + retain_weight · L_retain(D_retain)

Losses come from the fused functions on the decoder's final hidden states and the LM head (the
model's logits are never formed). Reference log-probabilities (TNPO, WTNPO, NPO) come from a frozen
copy of the *starting* model, once per sample. Every ``checkpoint_every`` steps the model, optimizer,
scheduler and RNG state are written atomically; a rerun with the same ``out_dir`` resumes from there
and, because batches and the schedule are functions of the step number, ends bit-identical to a run
that was never interrupted.
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
from ..objectives import OBJECTIVES, unlearning_loss
from ..retain import kl_loss
from .checkpoint import CHECKPOINT, atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .train_config import TrainConfig
from .frozen_model import RefLogprobCache, frozen_copy
from .schedule import batch_indices, warmup_linear_decay

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


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


class _NonFinite(ArithmeticError):
    pass


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
    return kl_loss(x.hidden, x.weight, r.hidden, r.weight, x.labels, bias=x.bias, ref_bias=r.bias,
                   softcap=x.softcap, shift=True, backend=config.backend)


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


def _save_model(model, out_dir: Path):
    tmp, final = out_dir / ".model.tmp", out_dir / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def train(model, forget, retain, config: TrainConfig, *, evaluate=None, resume=True) -> TrainResult:
    """Run ``config.steps`` optimizer steps on ``model`` (in place) and return the logged metrics.

    Args:
        model: a Hugging Face causal LM in its *starting* state (the reference copy is taken from it,
            also when resuming: the checkpoint's weights are loaded afterwards).
        forget, retain: `EncodedSet`s (``retain`` may be None with ``retain_objective="none"``).
        evaluate: optional ``evaluate(model) -> dict`` called every ``config.eval_every`` steps; its
            numbers go into the metrics log.
        resume: continue from ``config.out_dir``'s checkpoint when one exists.
    """
    spec = OBJECTIVES[config.objective]
    if len(forget) == 0:
        raise ValueError("the forget set is empty")
    if config.uses_retain and (retain is None or len(retain) == 0):
        raise ValueError(f"retain objective {config.retain_objective!r} needs a non-empty retain set")
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    reference = frozen_copy(model) if spec.needs_ref or (config.uses_retain and config.retain_objective == "kl") \
        else None
    ref_cache = RefLogprobCache(reference, forget, backend=config.backend) if spec.needs_ref else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(config.warmup_steps, config.steps))
    profiler = history = None
    if config.geffect_every:
        from ..geffect import GEffectHistory, GEffectProfiler
        profiler = GEffectProfiler(model, groups=config.geffect_groups)
        history = GEffectHistory(config.objective)

    out = Path(config.out_dir) if config.out_dir else None
    start, metrics = 0, []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config.to_dict())
        state = load_checkpoint(out) if resume else None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            start = state["step"]
            if history is not None:
                history = state["geffects"]
        # drop whatever was logged after the checkpoint: those steps run again
        metrics = _read_metrics(out / METRICS, start)
        atomic_write_text(out / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
    last_good = start if (out is not None and start > 0) else None

    def forget_batch(micro):
        idx = batch_indices(len(forget), config.batch_size, config.seed, micro)
        batch = _to(forget.batch(idx), device)
        ref = ref_cache.batch(idx, batch["input_ids"].shape[1], device) if ref_cache else None
        return batch, ref

    def retain_batch(micro):
        idx = batch_indices(len(retain), config.batch_size, config.seed + 1, micro)
        return _to(retain.batch(idx), device)

    model.train()
    # disable=None: a bar on a terminal, none when the output is a log file or a pipe
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"{config.objective}",
               disable=None if config.progress else True, leave=False)
    for step in bar:
        number = step + 1  # steps are counted from 1: "step 5" is the fifth update
        record = {"step": number, "lr": scheduler.get_last_lr()[0]}
        if profiler is not None and step % config.geffect_every == 0:
            f_batch, f_ref = forget_batch(step * config.grad_accum)
            r_batch = retain_batch(step * config.grad_accum) if retain is not None else None
            with autocast:
                result = profiler.measure_unlearning(
                    config.objective, f_batch, r_batch, ref_logprobs=f_ref,
                    retain_objective=config.retain_objective if config.uses_retain else None, **config.hparams)
            history.record(number, result)  # measured at the parameters this step's update starts from
            record.update(e_forget=float(result.total["forget"]), e_retain=float(result.total.get("retain", 0.0)))

        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "forget_loss": 0.0, "retain_loss": 0.0}
        for k in range(config.grad_accum):
            micro = step * config.grad_accum + k
            f_batch, f_ref = forget_batch(micro)
            try:
                with autocast:
                    forget_loss = _objective_loss(config.objective, model, f_batch, config, f_ref, config.hparams)
                    retain_loss = torch.zeros((), device=device)
                    if config.uses_retain and config.retain_objective == "nll":
                        retain_loss = _objective_loss("nll", model, retain_batch(micro), config)
                    elif config.uses_retain:
                        retain_loss = _kl_retain_loss(model, reference, retain_batch(micro), config)
                    loss = config.forget_weight * forget_loss + config.retain_weight * retain_loss
                if not torch.isfinite(loss):
                    raise _NonFinite(f"the loss is {loss.item()}")
            except _NonFinite as err:
                where = (f"the last good checkpoint is step {last_good} in {out / CHECKPOINT}" if last_good
                         else "no checkpoint was written")
                raise TrainingDiverged(f"{err} at step {number}; stopped, {where}") from None
            (loss / config.grad_accum).backward()
            for key, value in (("loss", loss), ("forget_loss", forget_loss), ("retain_loss", retain_loss)):
                sums[key] += float(value.detach()) / config.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        record.update(sums, grad_norm=float(norm), seconds=time.perf_counter() - t0)
        if evaluate is not None and config.eval_every and number % config.eval_every == 0:
            model.eval()
            record.update(evaluate(model))
            model.train()
        metrics.append(record)
        bar.set_postfix(loss=f"{sums['loss']:.4f}")

        if out is not None:
            with open(out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if number % config.checkpoint_every == 0 or number == config.steps:
                # the history rides in the checkpoint so that both always describe the same step
                save_checkpoint(out, {
                    "step": number, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "geffects": history,
                })
                last_good = number
    bar.close()
    model.eval()
    if out is not None:
        _save_model(model, out)
        if history is not None:
            history.to_json(out / GEFFECTS)
    return TrainResult(steps=config.steps, metrics=metrics, geffects=history, resumed_from=start)
