"""The backend seam: one interface every implementation meets, and the dispatch that picks one.

A backend receives inputs that are already validated and flattened (hidden ``[N, H]``, labels
``[N]`` int64, shift applied) and returns float32 (float64 for float64 inputs) results. Only
``token_logprobs`` is mandatory; the other methods have generic versions built on it, which a
backend overrides where it has something faster (a fused kernel, gradients produced in the forward).
"""
from __future__ import annotations

import importlib
import os

import torch

from ..weighting import TokenWeighting


class Backend:
    name = "abstract"

    def is_available(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device`` here and now."""
        raise NotImplementedError

    # -- hidden states + LM head ------------------------------------------------------------
    def token_logprobs(self, hidden, weight, bias, labels, *, ignore_index, softcap):
        """ℓ_t = z_t[y_t] − logsumexp(z_t) per position, 0 where ignored; differentiable."""
        raise NotImplementedError

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, *, ignore_index, softcap,
                      weighting: TokenWeighting, scale: float):
        """scale · Σ_t w_t ℓ_t with detached weights w_t = weighting(ℓ_t, ℓ_ref,t)."""
        logprobs = self.token_logprobs(hidden, weight, bias, labels, ignore_index=ignore_index,
                                       softcap=softcap)
        coef = weighting.weights(logprobs.detach(), ref_logprobs) * scale
        return (coef * logprobs).sum()

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *,
                      ignore_index, softcap, scale: float):
        """scale · Σ_valid KL(p_ref,t ‖ p_θ,t); no gradient flows to the reference side."""
        raise NotImplementedError

    # -- logits given ---------------------------------------------------------------------
    def token_logprobs_from_logits(self, logits, labels, *, ignore_index, softcap):
        raise NotImplementedError

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, *, ignore_index, softcap,
                                  weighting: TokenWeighting, scale: float, inplace: bool = False):
        """As `weighted_loss`; ``inplace`` allows overwriting ``logits`` with the gradient (ignored here)."""
        logprobs = self.token_logprobs_from_logits(logits, labels, ignore_index=ignore_index,
                                                   softcap=softcap)
        coef = weighting.weights(logprobs.detach(), ref_logprobs) * scale
        return (coef * logprobs).sum()


# Backends by name, imported on first use so that a kernel backend whose dependencies are missing
# costs nothing and breaks nothing. Later entries plug in by adding a line here.
_MODULES = {
    "reference": "geffect_kernels.reference",
    "torch": "geffect_kernels.ops.chunked",
    "triton": "geffect_kernels.triton.backend",
    "cuda": "geffect_kernels.csrc.backend",
    "cpu": "geffect_kernels.csrc.backend",
}
# `backend="auto"` tries these in order for the tensors' device type (fastest measured first).
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
_loaded: dict[str, Backend | None] = {}


def _load(name: str) -> Backend | None:
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            _loaded[name] = module.BACKENDS[name]
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` in this environment."""
    device = torch.device(device)
    return [n for n in _MODULES if (b := _load(n)) is not None and b.is_available(device)]


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``name`` (or ``"auto"``) to a backend that runs on ``device``; raise otherwise."""
    if name == "auto":
        env = os.environ.get("GEFFECT_BACKEND")
        if env:
            return get_backend(env, device)
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            backend = _load(candidate)
            if backend is not None and backend.is_available(device):
                return backend
        return _load("reference")
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; valid: 'auto', " + ", ".join(map(repr, _MODULES)))
    backend = _load(name)
    if backend is None or not backend.is_available(device):
        raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors here; "
                           f"available: {available_backends(device)}")
    return backend
