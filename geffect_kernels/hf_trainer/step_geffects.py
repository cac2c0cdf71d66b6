"""G-effects of an unlearning Trainer's steps: every ``every`` updates, at the parameters the update starts from, on
its first micro-batch pair (the loop's `train.loop.Run.profile`). Under DDP rank 0 measures its micro-batch (one
process's first, at the same parameters) and the ranks take its values, so that all of them log and stop alike."""
from __future__ import annotations

import torch

from ..geffect import GEffectHistory, GEffectProfiler
from ..model_mode import eval_mode


def _without_index(batch):
    return None if batch is None else {k: v for k, v in batch.items() if k != "index"}


class StepGEffects:
    def __init__(self, objective: str, hparams: dict, retain_objective: str | None, *, every: int, groups="layer"):
        self.objective, self.hparams, self.retain_objective = objective, hparams, retain_objective
        self.every, self.groups = every, groups
        self.history = GEffectHistory(objective)
        self._profiler = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, model, pair, reference, step: int) -> dict:
        """``{"e_forget", "e_retain"}`` at ``step`` on ``pair`` (a collated forget-retain batch), recorded in
        `history` (records from ``step`` on, left by an earlier run of the same steps, are dropped)."""
        values = None
        if _rank() == 0:
            if self._profiler is None or self._profiler.model is not model:
                self._profiler = GEffectProfiler(model, groups=self.groups)
            forget = pair["forget"]
            with eval_mode(model):  # no dropout, and the run's random stream is left alone
                result = self._profiler.measure_unlearning(
                    self.objective, _without_index(forget), _without_index(pair.get("retain")),
                    reference=reference.state(forget), retain_objective=self.retain_objective, **self.hparams)
            values = result
        values = _from_rank_zero(values)
        while self.history.steps and self.history.steps[-1] >= step:
            self.history.steps.pop()
            self.history.results.pop()
        self.history.record(step, values)
        out = {"e_forget": float(values.total["forget"])}
        if "retain" in values.total:
            out["e_retain"] = float(values.total["retain"])
        return out


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _from_rank_zero(value):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
