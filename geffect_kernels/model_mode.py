"""A model in eval mode for a while (no dropout), every module back in its own mode afterwards."""
from contextlib import contextmanager


@contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block; after it (also after an error) each module has the mode it had, so a
    module kept in eval mode inside a training model stays in eval mode."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
