"""Per-token statistics of the model's distribution p_t over the vocabulary, fused with the LM head.

Membership-inference scores (min-k%++) and entropy metrics need, besides ℓ_t = log p_t(y_t), the mean and the
spread of log p_t under p_t itself: the entropy H_t = −E_{v~p_t}[log p_t(v)] and Var_{v~p_t}[log p_t(v)]. Both
come from the same single pass over the vocabulary as the log-sum-exp (DESIGN §2), so the N×V logits are never
formed: log p_t(v) = z_v − LSE_t differs from the logit z_v by a per-token constant, hence
H_t = LSE_t − E_p[z] and Var_p[log p] = Var_p[z].
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .catalog import IGNORE_INDEX
from .backends.interface import Backend
from .backends.registry import get_backend
from .inputs import prepare_head


class TokenStats(NamedTuple):
    """Per-token results, each shaped like the labels (after the shift), 0 where the label is ignored."""

    logprob: torch.Tensor  # ℓ_t = log p_t(y_t)
    entropy: torch.Tensor  # H_t = −Σ_v p_t(v) log p_t(v)
    logprob_var: torch.Tensor  # Var_{v~p_t}[log p_t(v)] = Σ_v p_t(v) (log p_t(v) + H_t)²


def token_stats(hidden, weight, labels, *, bias=None, ignore_index=IGNORE_INDEX, softcap=None, shift=False,
                backend="auto", check_values=None) -> TokenStats:
    """ℓ_t, the entropy of p_t and the variance of log p_t under p_t, over a linear LM head, in one pass.

    Arguments as `token_logprobs` (soft-capped logits with ``softcap``; the Hugging Face ``shift``).
    Forward only: runs without autograd and returns detached float32 tensors (float64 for float64 inputs).
    For min-k%++, μ_t = −entropy and σ_t = sqrt(logprob_var).
    """
    with torch.no_grad():
        prep = prepare_head(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
                            backend=backend, check_values=check_values)
        detached = None if bias is None else bias.detach()
        backend = prep.backend
        if type(backend).token_stats is Backend.token_stats:  # no kernel of its own
            backend = get_backend("torch", prep.hidden)
        stats = backend.token_stats(prep.hidden.detach(), weight.detach(), detached, prep.labels, prep.opts)
    return TokenStats(*(t.reshape(prep.out_shape) for t in stats))


__all__ = ["TokenStats", "token_stats"]
