"""Triton kernels for the ``triton`` backend (CUDA; CPU float32 under TRITON_INTERPRET=1, for tests).

`set_logits_budget` chooses between the lean mode (default, four matmul-sized passes, no logits held)
and the fast mode (three passes, logit tiles held for chunks of tokens within the budget).
"""
from .config import interpreting, logits_budget, set_logits_budget

if interpreting():
    from . import interpreter_compat

    interpreter_compat.apply()

__all__ = ["logits_budget", "set_logits_budget"]
