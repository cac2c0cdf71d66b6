"""G-effects during an existing ``transformers.Trainer`` run.

    callback = GEffectCallback(forget_batch, retain_batch, objective="npo", every=10, ref_logprobs=ref)
    Trainer(model=model, ..., callbacks=[callback]).train()
    callback.history.to_csv("geffects.csv")

At every ``every``-th step's start the profiler measures the objective's G-effects on the forget and
retain NLL at the current parameters (fixed probe batches, so steps are comparable), and those of the
``retain_objective`` term (nll, kl, rr: ``result.retain_term``). PO and DPO read substitute answers that the forget
batch carries (`objective_inputs.with_alternate`); ``reference`` (an `objective_inputs.ReferenceState`) holds what
DPO, KL and RR compare with. An objective that needs
reference log-probabilities (NPO, TNPO, WTNPO) takes ``ref_logprobs`` or, without them, those of the model as
training begins (the starting model: no copy of it is kept), computed once and kept on the CPU. It measures in
``eval()`` mode (no dropout: exact values, and the run's random stream is left alone, so training goes
exactly as it would without the callback) and restores each module's mode afterwards. A new ``train()``
(a rerun, or a resume from a checkpoint) drops the records from its starting step on.

On a model sharded with FSDP2 (accelerate's FSDP2 plugin) every rank passes its slice of the probe batches
and records the G-effects of the whole batches (`geffect.sharded`). accelerate 1.15 turns FSDP on for GPU
and other accelerator processes only: on CPU processes (gloo) the Trainer runs DDP, which the callback
measures like one process.
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .catalog import OBJECTIVES
from .geffect import GEffectHistory, GEffectProfiler


class GEffectCallback(TrainerCallback):
    def __init__(self, forget_batch, retain_batch=None, *, objective="ga", every=10, ref_logprobs=None,
                 groups="layer", output_dir=None, reference=None, retain_objective="nll", **hparams):
        if every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        self.forget_batch, self.retain_batch, self.ref_logprobs = forget_batch, retain_batch, ref_logprobs
        self.objective, self.every, self.groups, self.hparams = objective, every, groups, hparams
        # what objectives beyond the forget answers' log-probabilities read (`objective_inputs.ReferenceState`: the
        # substitute answers' reference log-probabilities, the starting model for KL and RR, RMU's seed)
        self.reference, self.retain_objective = reference, retain_objective
        self.output_dir = Path(output_dir) if output_dir else None
        self.history = GEffectHistory(objective)
        self._profiler = None

    def on_train_begin(self, args, state, control, **kwargs):
        # global_step is 0 for a new run and the checkpoint's step for a resumed one: the steps from there on
        # are measured again (else recording them would fail, as steps must increase)
        keep = [i for i, step in enumerate(self.history.steps) if step < state.global_step]
        self.history.steps[:] = [self.history.steps[i] for i in keep]
        self.history.results[:] = [self.history.results[i] for i in keep]
        if self.ref_logprobs is None and OBJECTIVES[self.objective].needs_ref:
            if state.global_step > 0:
                raise ValueError(f"objective {self.objective!r} needs the starting model's log-probabilities of the "
                                 f"forget batch; a run resumed at step {state.global_step} no longer has that model: "
                                 f"pass ref_logprobs")
            self.ref_logprobs = _starting_logprobs(kwargs["model"], self.forget_batch)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        if self._profiler is None or self._profiler.model is not model:  # a reused callback, a new model
            self._profiler = GEffectProfiler(model, groups=self.groups)
        device = next(model.parameters()).device
        rows = _rank_rows(model, self.forget_batch, self.retain_batch)
        move = lambda batch, side: batch and {k: v[rows[side]].to(device) for k, v in batch.items()}
        ref = self.ref_logprobs[rows["forget"]].to(device) if self.ref_logprobs is not None else None
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            result = self._profiler.measure_unlearning(self.objective, move(self.forget_batch, "forget"),
                                                       move(self.retain_batch, "retain"), ref_logprobs=ref,
                                                       reference=self.reference,
                                                       retain_objective=self.retain_objective, **self.hparams)
        finally:
            for module, training in modes.items():
                module.training = training
        self.history.record(state.global_step, result)

    def on_train_end(self, args, state, control, **kwargs):
        if self.output_dir is not None and len(self.history) and state.is_world_process_zero:
            self.history.to_json(self.output_dir / "geffects.json")
            self.history.to_csv(self.output_dir / "geffects.csv")


def _starting_logprobs(model, batch):
    """``hf.token_logprobs`` of ``model`` on the whole ``batch`` in eval mode, on the CPU (on a sharded model every
    rank runs the whole batch: the forward passes take all of them)."""
    import torch

    from . import hf
    from .geffect.sharded import is_sharded, reshard
    from .model_mode import eval_mode

    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        logprobs = hf.token_logprobs(model, {k: v.to(device) for k, v in batch.items()}).cpu()
    if is_sharded(model):
        reshard(model)  # the root keeps its gathered parameters after a forward without backward
    return logprobs


def _rank_rows(model, forget_batch, retain_batch) -> dict:
    """The samples of each probe batch this process measures: all of them, or on a sharded (FSDP2) model
    this rank's slice (the profiler then returns the G-effects of the whole batches on every rank)."""
    from .geffect.sharded import is_sharded

    everything = {"forget": slice(None), "retain": slice(None)}
    if not is_sharded(model):
        return everything
    import torch.distributed as dist

    from .data_parallel import rank_rows
    rank, world = dist.get_rank(), dist.get_world_size()
    for side, batch in (("forget", forget_batch), ("retain", retain_batch)):
        if batch is not None:
            everything[side] = rank_rows(batch["input_ids"].shape[0], rank, world)
    return everything
