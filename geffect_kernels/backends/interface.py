"""The backend seam: the one interface every implementation of DESIGN §2 meets.

A backend receives inputs that are already validated and flattened (hidden ``[N, H]``, labels
``[N]`` int64, shift applied) and returns float32 (float64 for float64 inputs) results. Only
``token_logprobs`` is mandatory; the other methods have generic versions built on it, which a
backend overrides where it has something faster (a fused kernel, gradients produced in the forward).
Which backend runs a call, and where inputs a backend does not take go instead, is decided in one
place: `registry`.
"""
from __future__ import annotations

import torch


class Backend:
    name = "abstract"

    def is_available(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device`` here and now."""
        raise NotImplementedError

    def accepts(self, rows: torch.Tensor) -> bool:
        """Whether this backend's kernels take these inputs (hidden states or logits, ``[N, ·]``); the
        registry sends the ones it does not take to the chunked torch backend."""
        return True

    # -- hidden states + LM head ------------------------------------------------------------
    def token_logprobs(self, hidden, weight, bias, labels, *, ignore_index, softcap):
        """ℓ_t = z_t[y_t] − logsumexp(z_t) per position, 0 where ignored; differentiable."""
        raise NotImplementedError

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale):
        """scale · Σ_t w_t ℓ_t with detached weights w_t = weighting.weights(ℓ_t, ℓ_ref,t)."""
        logprobs = self.token_logprobs(hidden, weight, bias, labels, ignore_index=ignore_index, softcap=softcap)
        coef = weighting.weights(logprobs.detach(), ref_logprobs) * scale
        return (coef * logprobs).sum()

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *,
                      ignore_index, softcap, scale: float):
        """scale · Σ_valid KL(p_ref,t ‖ p_θ,t); no gradient flows to the reference side."""
        raise NotImplementedError

    # -- logits given ---------------------------------------------------------------------
    def token_logprobs_from_logits(self, logits, labels, *, ignore_index, softcap):
        raise NotImplementedError

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale,
                                  inplace: bool = False):
        """As `weighted_loss`; ``inplace`` allows overwriting ``logits`` with the gradient (ignored here)."""
        logprobs = self.token_logprobs_from_logits(logits, labels, ignore_index=ignore_index, softcap=softcap)
        coef = weighting.weights(logprobs.detach(), ref_logprobs) * scale
        return (coef * logprobs).sum()
