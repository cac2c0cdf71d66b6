"""A micro-step's two losses: an unlearning objective and a retain term, each a catalog entry computed by the one
function of its kind of input (`objective_inputs`).

Log-probability and distribution entries start from the decoder's final hidden states and the LM head
(`hf.head_inputs`); the model's logits are never formed. A rank of a sharded run wraps these in its global-batch parts
(`distributed.ShardedRun`).
"""
from __future__ import annotations

from .. import objective_inputs
from ..objective_inputs import NonFiniteLoss, ReferenceState, head_inputs

__all__ = ["NonFiniteLoss", "head_inputs", "kl_retain_loss", "objective_loss", "retain_loss"]


def _state(reference):
    """A `ReferenceState` from what a caller passes: one, a tensor of reference log-probabilities, or None."""
    return reference if isinstance(reference, ReferenceState) else ReferenceState(logprobs=reference)


def objective_loss(name, model, batch, *, backend, ref_logprobs=None, hparams=None):
    """Unlearning objective ``name`` of ``model`` on ``batch``; ``ref_logprobs``: a `ReferenceState` or the
    reference log-probabilities of the forget answers."""
    return objective_inputs.loss(objective_inputs.resolved(name, hparams), model, batch, _state(ref_logprobs),
                                 backend=backend)


def retain_loss(name, model, batch, reference, *, backend, normalization="tokens", layer=None):
    """Retain term ``name`` (`catalog.RETAIN_TERMS`) of ``model`` on ``batch``; ``reference``: a `ReferenceState`
    (the starting model for KL and RR), ``layer``: RR's layer when it is the objective's."""
    return objective_inputs.loss(name, model, batch, _state(reference), backend=backend,
                                 kl_normalization=normalization, layer=layer)


def kl_retain_loss(model, reference, batch, *, normalization, backend):
    """KL(model ‖ reference) on ``batch``, reduced as ``normalization`` says (`train_config.KL_NORMALIZATIONS`);
    ``reference`` a model or a `frozen_model` reference (its ``reference_inputs``)."""
    return retain_loss("kl", model, batch, ReferenceState(model=reference), backend=backend,
                       normalization=normalization)
