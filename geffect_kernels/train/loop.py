"""The unlearning loop, top to bottom: one loop for one process and for every rank of a sharded run.

    loss = forget_weight · L_objective(D_forget) + retain_weight · L_retain(D_retain)

`train` reads as its stages: check the inputs (before any file is written), lock the run folder, set up a `Run`
(reference, optimizer, profiler), resume, `run_steps`, finish. `run_steps` is the step loop: learning rate,
G-effects, the micro-steps (with the stop on a NaN loss), evaluate, log, checkpoint.

`Run` holds what the stages share, and its methods are where runs differ. `distributed.ShardedRun` (one rank of
an FSDP2 group) overrides the batches (`rows`: its slice), the losses (the global batch's), the reference, the
checkpoint files and the saved model, and only rank 0 is the `writer` of the run folder, the log and the progress
bar (nanoGPT's ``master_process``). Other extension points: `Run.micro_step_losses` (what a micro-step
backpropagates), `Run.reference_logprobs` (ℓ_ref of a forget batch), `Run.write_checkpoint` / `Run.restore`.

Losses come from the fused functions on the decoder's final hidden states and the LM head (`losses`).
Reference log-probabilities (TNPO, WTNPO, NPO) come from the *starting* model, once per sample. Every
``checkpoint_every`` steps the model, optimizer, RNG state, G-effect history and the settings that shape the run
are written atomically; a rerun with the same ``out_dir`` and settings resumes from there and, because batches
and the learning rate are functions of the step number, ends bit-identical to a run that was never interrupted
(`resume` says when other settings may continue a checkpoint).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backends.registry import check_backend
from ..geffect import GEffectHistory, GEffectProfiler
from ..guidance import step as guided
from ..guidance.stop import fired, parse_stop_when
from ..layers import layer_index
from ..objective_inputs import ReferenceState, trained_parameters
from .checkpoint import (CHECKPOINT, SHARDED_CHECKPOINTS, CheckpointError, atomic_write_json, atomic_write_text,
                         check_model_fits, check_optimizer_fits, check_own_folder, fitted, load_checkpoint,
                         remove_orphans, save_checkpoint)
from .frozen_model import StartingLogprobs, kl_reference
from .gradient_checkpointing import checkpointing
from .losses import NonFiniteLoss, objective_loss, retain_loss
from .precision import compute_autocast, float32_masters
from .pause_hook import pause_if_asked
from .presets import resolve as resolve_preset
from .resume import differences, run_settings, should_resume
from .run_lock import run_lock
from .schedule import batch_indices, warmup_linear_decay
from .train_config import TrainConfig
from ..structured_files import UnreadableFile, parse_jsonl_line, read_text

METRICS = "metrics.jsonl"
GEFFECTS = "geffects.json"
MODEL = "model"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    steps: int
    metrics: list[dict] = field(default_factory=list)
    geffects: object = None  # GEffectHistory when G-effects were recorded
    resumed_from: int = 0
    model: object = None  # the trained model (the caller's, trained in place; a sharded run's own)
    stopped_at: int | None = None  # updates made when a stop_when rule ended the run early


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
    # one writer per run folder, released however the run ends
    with run_lock(config.out_dir), checkpointing(model, config.gradient_checkpointing):
        run = Run(model, forget, retain, config)
        run.resume(resume)
        run_steps(run, evaluate)
        return run.finish()


def check_inputs(model, forget, retain, config):
    """Everything `train` can check before it writes a file: the data and the backend on the model's device
    (`TrainConfig` checked the settings when it was made)."""
    if len(forget) == 0:
        raise ValueError("the forget set is empty")
    if config.uses_retain and (retain is None or len(retain) == 0):
        raise ValueError(f"retain objective {config.retain_objective!r} needs a non-empty retain set")
    check_backend(config.backend, next(model.parameters()).device)
    check_entries(model, forget, config)


def check_entries(model, forget, config):
    """What the objective and the retain term read, checked on ``model`` and ``forget``: the substitute answers
    (PO, DPO), the layer (RMU, RR) and the parameters RMU trains."""
    objective = config.resolved_objective
    if objective.objective.reads_alternate:
        substitute_answers(forget, config)
    if objective.objective.level == "hidden" or (config.uses_retain and config.retain_term.level == "hidden"):
        layer_index(model, objective.hparams.get("layer", -1.0))
    trained_parameters(objective, model)


def check_resumable(model, forget, retain, config: TrainConfig, resume: bool | None = None) -> None:
    """Raise now what `train` would raise on meeting ``config.out_dir``'s checkpoint (CheckpointError,
    ResumeMismatch): a command that trains several runs checks them all before it starts the first."""
    config = resolve_preset(config, model, len(forget))
    if config.out_dir is not None:
        check_own_folder(config.out_dir)
    if config.out_dir is not None and resume is not False:
        should_resume(Path(config.out_dir), load_checkpoint(config.out_dir), run_settings(config, forget, retain),
                      resume)


def run_steps(run: Run, evaluate=None) -> None:
    """Steps ``run.start`` to ``config.steps`` of ``run``; on a sharded run every rank runs this in lockstep."""
    config = run.config
    run.model.train()
    # disable=None: a bar on a terminal, none when the output is a log file or a pipe
    bar = tqdm(range(run.start, config.steps), initial=run.start, total=config.steps, desc=config.objective,
               disable=None if config.progress and run.writer else True, leave=False)
    for step in bar:
        number = step + 1  # steps are counted from 1: "step 5" is the fifth update
        record = {"step": number, "lr": run.set_lr(step)}
        if run.profiler is not None and step % config.geffect_every == 0:
            record.update(run.profile(step, number))
            if run.stop_rule_fired(record, number):
                break
        record.update(run.optimizer_step(step, number))
        if evaluate is not None and config.eval_every and number % config.eval_every == 0:
            record.update(run.evaluate(evaluate))
        run.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if run.out is not None and (number % config.checkpoint_every == 0 or number == config.steps):
            run.checkpoint(number)
        pause_if_asked(number)
    bar.close()


class Run:
    """One training run in one process: the model and its optimizer, the data, the reference, the G-effect
    profiler and the run folder. Its methods are the stages `train` and `run_steps` call, in that order below;
    a subclass overrides those where its runs differ (`distributed.ShardedRun`)."""

    writer = True  # this process writes the run folder, the metrics log and the progress bar
    sharded = False  # its gradients are shards (FSDP2): a guided step sums its products over the ranks

    def __init__(self, model, forget, retain, config: TrainConfig):
        torch.manual_seed(config.seed)
        self.objective = config.resolved_objective
        if self.objective.objective.reads_alternate:
            forget = substitute_answers(forget, config)
        self.model, self.forget, self.retain, self.config = model, forget, retain, config
        self.device = next(model.parameters()).device
        self.reference, self.ref_cache = self.load_reference()
        self.alternate_cache = self.load_alternate_reference()
        self.half = float32_masters(model)  # after the reference: it keeps the dtype the model was loaded in
        self.params = trained_params(model, self.objective)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_factor = warmup_linear_decay(config.warmup_steps, config.steps)  # step -> factor of config.lr
        self.settings = run_settings(config, forget, retain)  # what shapes the run, stored in every checkpoint
        self.out = Path(config.out_dir) if config.out_dir else None
        self.profiler = GEffectProfiler(model, groups=config.geffect_groups) if config.geffect_every else None
        self.history = GEffectHistory(config.objective) if config.geffect_every else None
        self.start = 0  # the step the loop starts from (the checkpoint's, when resuming)
        self.metrics: list[dict] = []
        self.last_good: int | None = None  # the step of the last checkpoint written or resumed from
        self.setting_changes: list[dict] = []  # settings changed by resume=True: {"step", "before"}
        self.stop_rules = parse_stop_when(config.stop_when)
        self.stopped_at: int | None = None  # the updates made when a stop rule ended the run
        # PDU (open-unlearning's pdu.py): the retain term's weight is a dual variable λ, starting at retain_weight
        self.dual = float(config.retain_weight) if config.primal_dual is not None else None

    # -- the reference, the data, the losses ------------------------------------------------------------------

    def load_reference(self):
        """(the starting model a KL retain term compares with, the source of `reference_logprobs`): the model with
        its adapters disabled (LoRA) or a frozen copy (`frozen_model.kl_reference`); the starting model's
        log-probabilities of the whole forget set, computed now, before the first update."""
        config = self.config
        reference = kl_reference(self.model, config.reference_device) if self.uses_reference_model else None
        logprobs = (StartingLogprobs(self.model, self.forget, batch_size=config.batch_size, backend=config.backend)
                    if self.objective.objective.needs_ref else None)
        return reference, logprobs

    def load_alternate_reference(self):
        """The starting model's log-probabilities of the substitute answers, when the objective compares them (DPO)."""
        o = self.objective.objective
        if not (o.needs_ref and o.reads_alternate):
            return None
        return StartingLogprobs(self.model, self.forget.alternate_set(), batch_size=self.config.batch_size,
                                backend=self.config.backend)

    @property
    def uses_reference_model(self) -> bool:
        """Whether the retain term or the objective reads the starting model itself (KL, RR)."""
        return self.config.retain_term.needs_reference_model or self.objective.objective.needs_reference_model

    def reference_logprobs(self, indices, width):
        """``[len(indices), width - 1]`` reference log-probabilities of forget samples ``indices`` (HF shift) on
        this run's device, or None when the objective takes none."""
        return self.ref_cache.batch(indices, width, self.device) if self.ref_cache is not None else None

    def autocast(self):
        """The precision of the forward passes: bf16 autocast on CUDA, the weights' half dtype when they were
        loaded in one (`precision`)."""
        return compute_autocast(self.device, self.half)

    def rows(self, indices):
        """The samples of a global micro-batch that this process computes: all of them."""
        return indices

    def forget_batch(self, micro):
        """Forget micro-batch ``micro`` (this process's rows) and its `ReferenceState` (the starting model's
        log-probabilities of its answers, the starting model, RMU's seed)."""
        idx = self.rows(batch_indices(len(self.forget), self.config.batch_size, self.config.seed, micro))
        batch = _to(self.forget.batch(idx), self.device)
        alternate = None
        if self.alternate_cache is not None:
            alternate = self.alternate_cache.batch(idx, batch["alternate_input_ids"].shape[1], self.device)
        return batch, ReferenceState(self.reference_logprobs(idx, batch["input_ids"].shape[1]), alternate,
                                     self.reference, self.config.seed)

    def retain_batch(self, micro):
        idx = self.rows(batch_indices(len(self.retain), self.config.batch_size, self.config.seed + 1, micro))
        return _to(self.retain.batch(idx), self.device)

    def objective_loss(self, name, batch, ref_logprobs=None, hparams=None):
        return objective_loss(name, self.model, batch, backend=self.config.backend, ref_logprobs=ref_logprobs,
                              hparams=hparams)

    def retain_loss(self, batch):
        """The retain term (`TrainConfig.retain_term`) on retain ``batch``; RR reads the objective's layer when it
        has one."""
        config = self.config
        return retain_loss(config.retain_term, self.model, batch,
                           ReferenceState(model=self.reference, seed=config.seed), backend=config.backend,
                           normalization=config.kl_normalization, layer=self.objective.hparams.get("layer"))

    def micro_step_losses(self, micro) -> dict:
        """The weighted total ("loss", backpropagated) and its terms on micro-batch ``micro`` (forward only);
        NonFiniteLoss on a NaN or inf total."""
        config = self.config
        f_batch, f_ref = self.forget_batch(micro)
        with self.autocast():
            forget_loss = self.objective_loss(config.objective, f_batch, f_ref, config.hparams)
            retain_loss = torch.zeros((), device=self.device)
            if config.uses_retain:
                retain_loss = self.retain_loss(self.retain_batch(micro))
            if self.dual is None:
                loss = config.forget_weight * forget_loss + config.retain_weight * retain_loss
            else:  # the Lagrangian L_u + λ (L_r − ε)
                loss = config.forget_weight * forget_loss + self.dual * (retain_loss - config.primal_dual)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the loss is {loss.item()}")
        return {"loss": loss, "forget_loss": forget_loss, "retain_loss": retain_loss}

    # -- one step ---------------------------------------------------------------------------------------------

    def set_lr(self, step) -> float:
        """The step's learning rate, a function of the step and the settings alone (nothing to restore on
        resume)."""
        lr = self.config.lr * self.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def profile(self, step, number) -> dict:
        """G-effects at the parameters this step's update starts from, on the step's first micro-batches."""
        config = self.config
        f_batch, f_ref = self.forget_batch(step * config.grad_accum)
        r_batch = self.retain_batch(step * config.grad_accum) if self.retain is not None else None
        with self.autocast():
            result = self.profiler.measure_unlearning(
                config.objective, f_batch, r_batch, reference=f_ref,
                retain_objective=config.retain_objective if config.uses_retain else None, **config.hparams)
        while self.history.steps and self.history.steps[-1] >= number:  # recorded before a stop rule ended a run
            self.history.steps.pop()
            self.history.results.pop()
        self.history.record(number, result)
        return {"e_forget": float(result.total["forget"]), "e_retain": float(result.total.get("retain", 0.0))}

    def optimizer_step(self, step, number) -> dict:
        """``grad_accum`` micro-steps, clipping, one AdamW update; TrainingDiverged on a NaN or inf loss."""
        config = self.config
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "forget_loss": 0.0, "retain_loss": 0.0}
        try:
            if config.guidance is not None:
                sums = self.guided_gradients(step)
            for k in range(config.grad_accum if config.guidance is None else 0):
                losses = self.micro_step_losses(step * config.grad_accum + k)
                (losses["loss"] / config.grad_accum).backward()
                for key, value in losses.items():
                    sums[key] += float(value.detach()) / config.grad_accum
        except NonFiniteLoss as err:
            where = (f"the last good checkpoint is step {self.last_good} in {self.checkpoint_path(self.last_good)}"
                     if self.last_good else "no checkpoint was written")
            raise TrainingDiverged(f"{err} at step {number}; stopped, {where}") from None
        norm = torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm or float("inf"))
        self.optimizer.step()
        dual = {}
        if self.dual is not None:  # the step's λ, then the dual ascent on the constraint retain loss ≤ ε
            dual = {"dual": self.dual}
            self.dual = max(0.0, self.dual + config.dual_step * (sums["retain_loss"] - config.primal_dual))
        return {**sums, **dual, "grad_norm": float(norm), "seconds": time.perf_counter() - t0}

    def guided_gradients(self, step) -> dict:
        """``.grad`` of a G-effect-guided step (`guidance.step`) and its loss sums."""
        if self.config.guidance == "rectify":
            return guided.rectified_gradients(self, step, NonFiniteLoss, sharded=self.sharded)
        return guided.instance_gradients(self, step, self.config.guidance_temperature, NonFiniteLoss)

    def stop_rule_fired(self, record: dict, number) -> bool:
        """Whether a ``stop_when`` rule holds on the G-effects just recorded (before step ``number``'s update):
        then the record says which and when, is logged, and the state after the last update is checkpointed."""
        reason = fired(self.stop_rules, self.history, number)
        if reason is None:
            return False
        self.stopped_at = number - 1
        record.update({"stopped": reason, "updates": number - 1})
        self.log(record)
        if self.out is not None and self.last_good != number - 1:
            self.checkpoint(number - 1)
        return True

    def evaluate(self, evaluate) -> dict:
        """``evaluate(model)``'s numbers, the model in eval mode meanwhile (on every rank of a sharded run)."""
        self.model.eval()
        try:
            return evaluate(self.model)
        finally:
            self.model.train()

    def log(self, record: dict):
        self.metrics.append(record)
        if self.writer and self.out is not None:
            with open(self.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- the run folder: resume, checkpoints, the end -------------------------------------------------------

    def sync(self):
        """Wait until every process of the run gets here (one process: at once)."""

    def resume(self, resume: bool | None):
        """Clear what a killed run left, then continue the folder's checkpoint (`should_resume`) or start over;
        the metrics log is trimmed to the checkpoint's step (later lines are steps that run again)."""
        if self.out is None:
            return
        if self.writer:
            check_own_folder(self.out)  # before anything is removed
            remove_orphans(self.out)
            if resume is False:
                self.remove_checkpoints()
                for name in (METRICS, GEFFECTS):
                    (self.out / name).unlink(missing_ok=True)
                shutil.rmtree(self.out / MODEL, ignore_errors=True)
        self.sync()
        state = self.read_checkpoint()
        if should_resume(self.out, state, self.settings, resume):
            self.restore(state)
            if self.dual is not None and state.get("dual") is not None:
                self.dual = state["dual"]
            self.start = self.last_good = state["step"]
            self.setting_changes = list(state.get("setting_changes", []))
            changed = differences(state["settings"], self.settings)
            if changed:
                self.setting_changes.append({"step": self.start,
                                             "before": {k: old for k, (old, _) in changed.items()}})
            if self.history is not None and state.get("geffects") is not None:
                self.history = GEffectHistory.from_dict(state["geffects"])
        self.metrics = _read_metrics(self.out / METRICS, self.start)
        if self.writer:
            config = self.config.to_dict()
            if self.setting_changes:  # what the weights were also trained with (resume=True with other settings)
                config["setting_changes"] = self.setting_changes
            atomic_write_json(self.out / "config.json", config)
            atomic_write_text(self.out / METRICS, "".join(json.dumps(m) + "\n" for m in self.metrics))
        self.sync()

    def checkpoint(self, number):
        """Write the state after step ``number``; a rerun continues from it."""
        self.write_checkpoint(number)
        self.last_good = number

    def loop_state(self, number) -> dict:
        """What every checkpoint holds besides the weights, optimizer and RNG: the step, the settings and the
        G-effect history (in the checkpoint, so that both always describe the same step)."""
        return {"step": number, "settings": self.settings, "setting_changes": self.setting_changes,
                "geffects": self.history.to_dict() if self.history is not None else None, "dual": self.dual}

    def checkpoint_path(self, number) -> Path:
        return self.out / CHECKPOINT

    def write_checkpoint(self, number):
        save_checkpoint(self.out, {
            **self.loop_state(number), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })

    def read_checkpoint(self) -> dict | None:
        """The folder's checkpoint (at least `loop_state`'s keys), or None when there is none."""
        return load_checkpoint(self.out)

    def restore(self, state: dict):
        """Load the weights, optimizer and RNG state of checkpoint ``state`` (`read_checkpoint`)."""
        path = self.checkpoint_path(state["step"])
        with fitted(path, "model"):
            check_model_fits(self.model, state["model"])
            self.model.load_state_dict(state["model"])
        with fitted(path, "optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
            check_optimizer_fits(self.optimizer)
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def remove_checkpoints(self):
        """Starting over: the folder's checkpoints of either kind (one process's or a sharded run's) go."""
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        shutil.rmtree(self.out / SHARDED_CHECKPOINTS, ignore_errors=True)

    def finish(self) -> TrainResult:
        """The trained model into ``out/model`` (written beside it, then renamed) and the G-effect history."""
        self.model.eval()
        if self.out is not None:
            tmp, final = self.out / f".{MODEL}.tmp", self.out / MODEL
            if self.writer:
                shutil.rmtree(tmp, ignore_errors=True)
            self.sync()
            self.save_model(tmp)
            if self.writer:
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                if self.history is not None:
                    atomic_write_json(self.out / GEFFECTS, self.history.to_dict())
            self.sync()
        return TrainResult(steps=self.config.steps if self.stopped_at is None else self.stopped_at,
                           metrics=self.metrics, geffects=self.history, stopped_at=self.stopped_at,
                           resumed_from=self.start, model=self.model)

    def save_model(self, folder: Path):
        self.model.save_pretrained(folder)


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Logged lines of steps ≤ ``up_to_step`` (what the checkpoint covers); a torn last line is dropped."""
    lines = []
    if path.is_file():
        for number, line in enumerate(read_text(path).splitlines(), 1):
            try:
                record = parse_jsonl_line(line, path, number)
            except UnreadableFile:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise CheckpointError(f"{path} line {number}: not a step's record (a JSON object with an integer "
                                      f"step), got {line:.40}; delete the file or pass --overwrite (resume=False)")
            if record["step"] <= up_to_step:
                lines.append(record)
    return lines


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def trained_params(model, objective) -> list:
    """The parameters the optimizer updates: every trainable one, or only those the objective trains (RMU), the
    others then frozen (``requires_grad=False``)."""
    only = trained_parameters(objective, model)
    if only is not None:
        for name, p in model.named_parameters():
            if name not in only:
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def substitute_answers(forget, config):
    """``forget`` with substitute answers for its questions: its own, else those of ``config.alternate``
    (`data.alternates`); ValueError when there are none."""
    if getattr(forget, "alternates", None) is not None:
        return forget
    if config.alternate is None:
        raise ValueError(f"objective {config.objective!r} reads substitute answers for the forget questions: set "
                         f"TrainConfig(alternate=FILE) (--alternate FILE), e.g. TOFU's idontknow.jsonl")
    from ..data.alternates import with_alternates

    return with_alternates(forget, config.alternate, seed=config.seed)
