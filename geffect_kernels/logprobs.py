"""The one primitive (DESIGN §2): per-token log-probabilities ℓ_t = log p_θ(y_t | y_<t)."""
from __future__ import annotations

from .catalog import IGNORE_INDEX
from .inputs import prepare_head, prepare_logits


def token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=IGNORE_INDEX, softcap=None, shift=False,
                   backend="auto", check_values=None):
    """ℓ_t for every position, over a linear LM head, without materializing the N×V logits.

    Args:
        hidden: final hidden states, ``[B, T, H]`` or ``[N, H]``.
        weight: LM head ``[V, H]``; ``bias``: optional ``[V]``.
        labels: target ids shaped like ``hidden`` without its last dimension; ``ignore_index`` marks
            positions that contribute 0 and no gradient.
        softcap: optional final-logit soft-cap s (z ← s·tanh(z/s)).
        shift: Hugging Face convention (position t predicts label t+1): drops the last position and
            the first label, so the result is ``[B, T-1]``.
        backend: ``"auto"`` or a backend name (see ``available_backends``).
        check_values: also refuse NaN/inf inputs and labels outside ``[0, V)`` (default: the environment
            variable GEFFECT_CHECK_VALUES=1); reading values makes the host wait for the device.

    Returns:
        float32 (float64 for float64 inputs) tensor shaped like ``labels`` (after the shift),
        differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    prep = prepare_head(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
                        backend=backend, check_values=check_values)
    out = prep.backend.token_logprobs(prep.hidden, weight, bias, prep.labels, prep.opts)
    return out.reshape(prep.out_shape)


def token_logprobs_from_logits(logits, labels, *, ignore_index=IGNORE_INDEX, softcap=None, shift=False,
                               backend="auto", check_values=None):
    """ℓ_t from logits the caller already holds (``[B, T, V]`` or ``[N, V]``); see `token_logprobs`."""
    prep = prepare_logits(logits, labels, ignore_index=ignore_index, shift=shift, softcap=softcap, backend=backend,
                          check_values=check_values)
    out = prep.backend.token_logprobs_from_logits(prep.hidden, prep.labels, prep.opts)
    return out.reshape(prep.out_shape)


__all__ = ["token_logprobs", "token_logprobs_from_logits"]
