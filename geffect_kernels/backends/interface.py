"""The backend seam: the one interface every implementation of DESIGN §2 meets.

A backend receives inputs that are already validated and flattened (hidden ``[N, H]``, labels
``[N]`` int64, shift applied) and returns float32 (float64 for float64 inputs) results. Only
``token_logprobs`` is mandatory; the other methods have generic versions built on it (``token_stats``: the
chunked torch backend's), which a backend overrides where it has something faster (a fused kernel,
gradients produced in the forward).
Which backend runs a call, and where inputs a backend does not take go instead, is decided in one
place: `registry`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..catalog import IGNORE_INDEX


@dataclass(frozen=True)
class LossOptions:
    """Everything about a call that is not a tensor, built once by the public function."""

    ignore_index: int = IGNORE_INDEX
    softcap: float | None = None  # final-logit soft-cap s: z ← s·tanh(z/s)
    weighting: object = None  # the objective's detached per-token weights (`catalog.TokenWeighting`)
    scale: float = 1.0  # the loss is scale · Σ_t w_t ℓ_t (scale · Σ_valid KL_t)
    inplace: bool = False  # a logits loss may overwrite the caller's logits with their gradient


class Backend:
    name = "abstract"
    traceable = False  # plain torch operations that torch.compile traces itself (else: `custom_ops`)

    def is_available(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device`` here and now."""
        raise NotImplementedError

    def accepts(self, rows: torch.Tensor) -> bool:
        """Whether this backend's kernels take these inputs (hidden states or logits, ``[N, ·]``); the
        registry sends the ones it does not take to the chunked torch backend."""
        return True

    # -- hidden states + LM head ------------------------------------------------------------
    def token_logprobs(self, hidden, weight, bias, labels, opts: LossOptions):
        """ℓ_t = z_t[y_t] − logsumexp(z_t) per position, 0 where ignored; differentiable."""
        raise NotImplementedError

    def logprobs_kernels(self, opts: LossOptions):
        """What `token_logprobs` runs (`autograd.token_logprobs`): ``forward(hidden, weight, bias, labels) -> (ℓ,
        (hidden, weight, bias, labels, lse))`` and ``backward(that tuple, ∂L/∂ℓ, wanted) -> (dh, dW, db, None)``;
        the custom operators call them apart (`custom_ops`)."""
        raise NotImplementedError

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, opts: LossOptions):
        """scale · Σ_t w_t ℓ_t with detached weights w_t = opts.weighting.weights(ℓ_t, ℓ_ref,t)."""
        logprobs = self.token_logprobs(hidden, weight, bias, labels, opts)
        return (opts.weighting.weights(logprobs.detach(), ref_logprobs) * opts.scale * logprobs).sum()

    def token_stats(self, hidden, weight, bias, labels, opts: LossOptions):
        """(ℓ_t, entropy H_t, Var_{p_t}[log p_t]) per position, each 0 where ignored; forward only (no autograd).
        A backend without its own leaves it to the chunked torch backend (`geffect_kernels.token_stats`)."""
        raise NotImplementedError

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts: LossOptions):
        """scale · Σ_valid KL(p_ref,t ‖ p_θ,t); no gradient flows to the reference side."""
        raise NotImplementedError

    def target_cross_entropy(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts: LossOptions,
                             beta: float):
        """scale · Σ_valid CE(t_t, p_θ,t) = scale · Σ_valid −Σ_v t_t,v log p_θ,t,v with the detached target
        t_t = softmax(z_ref,t − β·onehot(y_t)) (`target_cross_entropy`: UNDIAL; ``ref_hidden`` None: z_ref is the
        model's own detached logits and β = inf is CE-U). Gradient (θ side only): scale · (p_θ − t) · dz/du.
        A backend without its own runs it on the chunked torch backend (`registry.own_or_fallback`)."""
        raise NotImplementedError

    # -- logits given ---------------------------------------------------------------------
    def logits_logprobs_kernels(self, opts: LossOptions):
        """`logprobs_kernels` over given logits: ``forward(logits, labels) -> (ℓ, (logits, labels, lse))``,
        ``backward(that tuple, ∂L/∂ℓ, wanted) -> (dlogits, None)``."""
        raise NotImplementedError

    def token_logprobs_from_logits(self, logits, labels, opts: LossOptions):
        raise NotImplementedError

    def target_cross_entropy_from_logits(self, logits, labels, opts: LossOptions, beta: float):
        """`target_cross_entropy` of given logits against their own detached distribution (CE-U); run on the
        chunked torch backend unless a backend has its own (`registry.own_or_fallback`)."""
        raise NotImplementedError

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, opts: LossOptions):
        """As `weighted_loss`; ``opts.inplace`` allows overwriting ``logits`` with the gradient (ignored here)."""
        logprobs = self.token_logprobs_from_logits(logits, labels, opts)
        return (opts.weighting.weights(logprobs.detach(), ref_logprobs) * opts.scale * logprobs).sum()
