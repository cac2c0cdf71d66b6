"""Gradient checkpointing that trains LoRA adapters: torch's non-reentrant checkpoint around each decoder block.

The reentrant checkpoint (``use_reentrant=True``) builds a block's graph only when one of the block's *inputs*
requires a gradient. With LoRA nothing before the first block does (the embedding is frozen), so the checkpointed
blocks' outputs carry no gradient and every adapter keeps its zero-initialized ``lora_B``; the usual remedy is
``enable_input_require_grads``. The non-reentrant checkpoint records the graph from the parameters used inside the
block, so adapters train without it, and the recomputed forward is the same computation: gradients, hence
G-effects, are those of the run without checkpointing. transformers' ``gradient_checkpointing_enable`` also hooks
the input embedding to require a gradient; that hook is removed here (it would only carry a gradient nobody reads).
"""
from __future__ import annotations

from contextlib import contextmanager

from .. import hf

NON_REENTRANT = {"use_reentrant": False}


@contextmanager
def checkpointing(model, enabled: bool = True):
    """Checkpoint ``model``'s decoder blocks (a Hugging Face causal LM, under peft or not) while inside; the model's
    own setting is back afterwards. ValueError when the model does not support it."""
    lm = hf.causal_lm(model)
    if not enabled:
        yield
        return
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing")
    was_on = lm.is_gradient_checkpointing
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
    lm.disable_input_require_grads()
    try:
        yield
    finally:
        if not was_on:
            lm.gradient_checkpointing_disable()
