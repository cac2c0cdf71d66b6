"""A loss computed as the forward of the model a wrapper (DDP) wraps, so that the wrapper does what it does around a
forward: DistributedDataParallel readies its gradient all-reduce only for a backward of its own forward's output.
The fused losses run the decoder and the head themselves instead of ``model(**batch)``; this lets them go through
the wrapper's forward all the same."""
from __future__ import annotations


def run_as_forward(wrapper, module, compute):
    """``compute()`` (a loss of ``module``), called by ``wrapper``'s forward when ``wrapper`` wraps ``module``."""
    if wrapper is module:
        return compute()
    own = module.__dict__.get("forward")  # a forward set on the instance (accelerate's autocast wrapper)
    module.forward = lambda *args, **kwargs: compute()  # an instance attribute: found before the class's method
    try:
        return wrapper()
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
