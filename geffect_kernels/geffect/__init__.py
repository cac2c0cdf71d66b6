"""G-effect profiling (DESIGN §1, §4): per-group, per-instance and over-training G-effects without full
gradients. See `profiler.GEffectProfiler` and `result` (sign convention)."""
from .profiler import GEffectProfiler
from .result import GEffectHistory, GEffectResult

__all__ = ["GEffectHistory", "GEffectProfiler", "GEffectResult"]
