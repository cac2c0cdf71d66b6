"""Public alias (the path docs/backends.md documents) of the Triton backend's settings in `backends.triton`."""
from .backends.triton import logits_budget, set_logits_budget

__all__ = ["logits_budget", "set_logits_budget"]
