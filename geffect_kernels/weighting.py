"""Per-token weights of the token-level objectives (DESIGN §3), as detached functions of ℓ_t, ℓ_ref,t.

Kernels implement the same formulas in-kernel; this is the torch version every backend's generic
path and the analysis API (`token_weights`) use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# kind -> (needs ref_logprobs, hyper-parameters it reads)
KINDS = {
    "one": (False, ()),
    "wga": (False, ("alpha",)),
    "satimp": (False, ("alpha", "gamma")),
    "tnpo": (True, ("beta",)),
    "wtnpo": (True, ("alpha", "beta")),
}


@dataclass(frozen=True)
class TokenWeighting:
    """w_t as a function of the detached log-probabilities (and the reference ones)."""

    kind: str = "one"
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0

    @property
    def needs_ref(self) -> bool:
        return KINDS[self.kind][0]

    def weights(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        lp = logprobs.detach()
        if self.kind == "one":
            return torch.ones_like(lp)
        if self.kind == "wga":
            return torch.exp(self.alpha * lp)
        if self.kind == "satimp":
            # (1 − p)^γ through expm1 keeps precision when p → 0
            return torch.exp(self.alpha * lp) * (-torch.expm1(lp)).clamp_min(0) ** self.gamma
        # σ form of 2 p^β / (p^β + p_ref^β): exact and overflow-free
        tnpo = 2 * torch.sigmoid(self.beta * (lp - ref_logprobs.detach()))
        if self.kind == "tnpo":
            return tnpo
        return torch.exp(self.alpha * lp) * tnpo  # wtnpo


def npo_sequence_weights(seq_logprobs, ref_seq_logprobs, beta):
    """∂NPO/∂ℓ_seq · (number of sequences): 2σ(β(ℓ_seq − ℓ_ref,seq))."""
    return 2 * torch.sigmoid(beta * (seq_logprobs - ref_seq_logprobs))


def npo_sequence_losses(seq_logprobs, ref_seq_logprobs, beta):
    return -(2.0 / beta) * F.logsigmoid(-beta * (seq_logprobs - ref_seq_logprobs))


def simnpo_sequence_losses(seq_logprobs, counts, beta, delta):
    return -(2.0 / beta) * F.logsigmoid(-beta * seq_logprobs / counts - beta * delta)


def simnpo_sequence_weights(seq_logprobs, counts, beta, delta):
    """2σ(β ℓ_seq/n_seq + βδ); the loss's gradient with respect to ℓ_seq is this over n_seq."""
    return 2 * torch.sigmoid(beta * seq_logprobs / counts + beta * delta)
