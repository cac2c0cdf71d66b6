"""UNDIAL (Dong et al., NAACL 2025): self-distillation to the reference model's distribution with the label's logit
lowered by β, fused in the LM head (DESIGN §3)."""
from __future__ import annotations

from dataclasses import replace

from .catalog import IGNORE_INDEX
from .inputs import prepare_head_pair
from .ranges import POSITIVE, check_number

# open-unlearning's configs/trainer/UNDIAL.yaml (its class default is 1; the paper sweeps 3, 10, 30)
UNDIAL_BETA = 10.0


def undial_loss(hidden, weight, ref_hidden, ref_weight, labels, *, beta=UNDIAL_BETA, bias=None, ref_bias=None,
                ignore_index=IGNORE_INDEX, softcap=None, shift=False, backend="auto", check_values=None):
    """Mean over the answer tokens (labels not ``ignore_index``) of the cross-entropy −Σ_v t_t,v log p_θ,t,v to the
    detached target t_t = softmax(z_ref,t − β·onehot(y_t)), z_ref the reference model's logits
    (``ref_hidden``, ``ref_weight``, ``ref_bias``: the frozen original model, no gradient).

    Gradient: (p_θ − t)/n per position. Chunked like `kl_loss`: neither model's N×V logits exist at once. Both heads
    share the vocabulary, the soft-cap (applied before the shift) and the dtype. open-unlearning's
    ``compute_undial_loss`` averages over every position instead, prompt and padding included, and shifts an
    ignored position's vocabulary entry V − 100 (docs/conventions.md); the two agree when no position is ignored.
    """
    beta = check_number("beta", beta, POSITIVE)
    prep, ref = prepare_head_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                                  ignore_index=ignore_index, shift=shift, softcap=softcap, backend=backend,
                                  check_values=check_values)
    n = (prep.labels != prep.opts.ignore_index).sum().clamp_min(1).double()  # on the device: no synchronization
    return prep.backend.target_cross_entropy(prep.hidden, weight, bias, ref.hidden, ref_weight, ref_bias, prep.labels,
                                             replace(prep.opts, scale=1.0 / n), beta)


__all__ = ["UNDIAL_BETA", "undial_loss"]
