"""A micro-step's two losses on the fused LM head: an unlearning objective and the KL retain term.

Both start from the decoder's final hidden states and the LM head (`hf.head_inputs`); the model's logits are
never formed. A rank of a sharded run wraps these in its global-batch parts (`distributed.ShardedRun`).
"""
from __future__ import annotations

import torch

from .. import hf
from ..objectives import unlearning_loss
from ..retain import kl_loss


class NonFiniteLoss(ArithmeticError):
    """A loss, or the hidden states it starts from, holds NaN or inf."""


def head_inputs(model, batch):
    """``hf.head_inputs`` with the hidden states checked finite and cast to the head's dtype."""
    x = hf.head_inputs(model, batch)
    if not bool(torch.isfinite(x.hidden).all()):
        raise NonFiniteLoss("the hidden states hold NaN or inf")
    # under autocast the decoder may hand back another dtype than the head's; the kernels need one
    return x._replace(hidden=x.hidden.to(x.weight.dtype))


def objective_loss(name, model, batch, *, backend, ref_logprobs=None, hparams=None):
    """Unlearning objective ``name`` of ``model`` on ``batch`` (`objectives.unlearning_loss`)."""
    x = head_inputs(model, batch)
    return unlearning_loss(name, x.hidden, x.weight, x.labels, ref_logprobs=ref_logprobs, **x.as_kwargs(),
                           backend=backend, **(hparams or {}))


def kl_retain_loss(model, reference, batch, *, normalization, backend):
    """KL(model ‖ reference) on ``batch``, reduced as ``normalization`` says (`train_config.KL_NORMALIZATIONS`);
    ``reference`` a model or a `frozen_model` reference (its ``reference_inputs``)."""
    x = head_inputs(model, batch)
    with torch.no_grad():
        inputs = getattr(reference, "reference_inputs", None)
        r = inputs(batch) if inputs is not None else head_inputs(reference, batch)
    # a frozen reference keeps the dtype the model was loaded in while the trained weights are float32 masters
    # (`precision`): the two heads are compared in the trained one's dtype
    r = r._replace(hidden=r.hidden.to(x.hidden.dtype), weight=r.weight.to(x.weight.dtype),
                   bias=None if r.bias is None else r.bias.to(x.weight.dtype))
    # batchmean: every position counts, prompt and padding too, so no shift drops the last one
    return kl_loss(x.hidden, x.weight, r.hidden, r.weight, x.labels, bias=x.bias, ref_bias=r.bias, softcap=x.softcap,
                   shift=normalization == "tokens", backend=backend, reduction=normalization)
