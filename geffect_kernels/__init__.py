"""geffect_kernels: fast LLM-unlearning losses and their G-effect analysis.

The public API (see README.md): the token primitive, every objective of DESIGN §3, the retain and
representation losses, and Hugging Face helpers in ``geffect_kernels.hf``.
"""
from . import hf
from .geffect import GEffectHistory, GEffectProfiler, GEffectResult
from .logprobs import token_logprobs, token_logprobs_from_logits
from .objectives import (IGNORE_INDEX, OBJECTIVES, token_weights, unlearning_loss, unlearning_loss_from_logits,
                         unlearning_loss_from_logprobs)
from .backends.registry import available_backends
from .retain import kl_loss, rmu_direction, rmu_loss, rr_loss
from .token_stats import TokenStats, token_stats

__version__ = "0.1.0"

__all__ = [
    "GEffectHistory", "GEffectProfiler", "GEffectResult", "IGNORE_INDEX", "TokenStats",
    "OBJECTIVES", "available_backends", "hf", "kl_loss", "rmu_direction", "rmu_loss", "rr_loss",
    "token_logprobs", "token_logprobs_from_logits", "token_stats", "token_weights", "unlearning_loss",
    "unlearning_loss_from_logits", "unlearning_loss_from_logprobs",
]
