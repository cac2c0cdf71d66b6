"""``guidance="rectify"`` (`guidance.rectify`) as a TrainerCallback: where, in a group of parameters (a layer), the
objective's gradient g conflicts with the retain term's r (⟨g, r⟩ < 0), g loses its component along r; the update
is then rectified g + r (`guidance.step.rectified_gradients`, the loop's step).

The Trainer (`UnlearningTrainer`, which adds this callback for ``guidance="rectify"``) backpropagates the two terms
apart, holds g aside over the update's micro-batches, and calls `combine` after the last one, before clipping; it
logs ``rectified_groups``, the groups rectified at the last update."""
from __future__ import annotations

from transformers import TrainerCallback

from ..guidance.rectify import rectify_sharded
from ..guidance.step import layer_grouping


class RectifyCallback(TrainerCallback):
    def __init__(self, groups=None):
        self.groups = groups  # {parameter name: group}; None: the profiler's layers
        self.rectified_groups = 0

    def combine(self, model, objective_grads: dict) -> None:
        """``.grad`` (the retain term's) += rectify(``objective_grads``, retain term's), group by group."""
        params = {n: p for n, p in model.named_parameters() if n in objective_grads}
        retain = {n: p.grad for n, p in params.items()}
        grouping = self.groups if self.groups is not None else layer_grouping(model)
        new, products = rectify_sharded(objective_grads, retain, {n: grouping[n] for n in params},
                                        all_reduce=lambda t: None)  # one process: whole gradients already
        for name, p in params.items():
            p.grad.add_(new[name].to(p.grad.dtype))
        self.rectified_groups = int(((products[:, 0] < 0) & (products[:, 1] > 0)).sum())
