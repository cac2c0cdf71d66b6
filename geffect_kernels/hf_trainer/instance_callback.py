"""``guidance="instance"`` (`guidance.instance`) as a TrainerCallback: each forget sample's gradient is weighted by
its retaining G-effect against the update's retain gradient, so that the samples that raise the retain risk most count
least; the update is ∇ retain term + forget_weight · Σ_s w_s g_s (`guidance.step.instance_gradients`, the loop's
step).

The weights need the whole update's retain gradient before any forget sample's, so the Trainer (`UnlearningTrainer`,
which adds this callback for ``guidance="instance"``) hands `guided_gradients` the update's micro-batches as it
fetches them and backpropagates nothing itself for them; ``weight_min`` and ``weight_max`` go into the log."""
from __future__ import annotations

from types import SimpleNamespace

from transformers import TrainerCallback

from .. import objective_inputs
from ..guidance.instance import TEMPERATURE
from ..guidance.step import instance_gradients
from ..objective_inputs import NonFiniteLoss, ReferenceState


class _Update:
    """One update's micro-batches as `guidance.step` reads a run (`train.loop.Run`): its settings, model, batches,
    losses and autocast."""

    def __init__(self, trainer, batches):
        self.trainer, self.batches, self.model = trainer, batches, trainer.model
        self.config = SimpleNamespace(grad_accum=len(batches), forget_weight=trainer.forget_weight,
                                      retain_weight=trainer.retain_weight, objective=trainer.forget_term.entry,
                                      hparams=None)

    def autocast(self):
        return self.trainer.accelerator.autocast()

    def forget_batch(self, micro):
        batch = self.batches[micro]["forget"]
        return batch, self.trainer.reference.state(batch)

    def retain_batch(self, micro):
        return {k: v for k, v in self.batches[micro]["retain"].items()}

    def objective_loss(self, name, batch, ref=None, hparams=None):
        return objective_inputs.loss(objective_inputs.resolved(name, hparams), self.model, batch,
                                     ref if ref is not None else ReferenceState(), backend=self.trainer.backend)


class InstanceWeightingCallback(TrainerCallback):
    def __init__(self, temperature: float = TEMPERATURE):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"guidance_temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.weight_min = self.weight_max = None
        self._pool_holder = SimpleNamespace(guidance_buffers=None)  # the head's CPU buffers, kept between updates

    def guided_gradients(self, trainer, batches) -> dict:
        """``.grad`` of the update over ``batches`` (prepared micro-batch pairs); the loss means."""
        update = _Update(trainer, batches)
        update.guidance_buffers = self._pool_holder.guidance_buffers
        sums = instance_gradients(update, 0, self.temperature, NonFiniteLoss)
        self._pool_holder.guidance_buffers = update.guidance_buffers
        self.weight_min, self.weight_max = sums["weight_min"], sums["weight_max"]
        return sums
