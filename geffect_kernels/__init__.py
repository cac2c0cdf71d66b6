"""geffect_kernels: fast LLM-unlearning losses and their G-effect analysis.

The public API (see README.md): the token primitive, every objective of DESIGN §3, the retain and
representation losses, and Hugging Face helpers in ``geffect_kernels.hf``.

Names are imported on first use (PEP 562), so ``geffect --help`` and a bad flag answer without importing
torch or transformers. To export a name, add it to ``_EXPORTS``, ``__all__`` and the ``TYPE_CHECKING`` imports
(for type checkers); tests/test_cli_usage.py checks that the three agree.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it; a module exports itself under its name
_EXPORTS = {
    "hf": ".hf",
    "GEffectHistory": ".geffect", "GEffectProfiler": ".geffect", "GEffectResult": ".geffect",
    "token_logprobs": ".logprobs", "token_logprobs_from_logits": ".logprobs",
    "IGNORE_INDEX": ".objectives", "OBJECTIVES": ".objectives", "token_weights": ".objectives",
    "unlearning_loss": ".objectives", "unlearning_loss_from_logits": ".objectives",
    "unlearning_loss_from_logprobs": ".objectives",
    "available_backends": ".backends.registry",
    "kl_loss": ".retain", "rmu_direction": ".retain", "rmu_loss": ".retain", "rr_loss": ".retain",
    "TokenStats": ".token_distribution", "token_stats": ".token_distribution",
    "undial_loss": ".undial",
}

if TYPE_CHECKING:
    from . import hf
    from .backends.registry import available_backends
    from .geffect import GEffectHistory, GEffectProfiler, GEffectResult
    from .logprobs import token_logprobs, token_logprobs_from_logits
    from .objectives import (IGNORE_INDEX, OBJECTIVES, token_weights, unlearning_loss, unlearning_loss_from_logits,
                             unlearning_loss_from_logprobs)
    from .retain import kl_loss, rmu_direction, rmu_loss, rr_loss
    from .token_distribution import TokenStats, token_stats
    from .undial import undial_loss


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = importlib.import_module(module, __name__)
    value = loaded if module == f".{name}" else getattr(loaded, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "GEffectHistory", "GEffectProfiler", "GEffectResult", "IGNORE_INDEX", "OBJECTIVES", "TokenStats",
    "available_backends", "hf", "kl_loss", "rmu_direction", "rmu_loss", "rr_loss", "token_logprobs",
    "token_logprobs_from_logits", "token_stats", "token_weights", "undial_loss", "unlearning_loss",
    "unlearning_loss_from_logits", "unlearning_loss_from_logprobs",
]
