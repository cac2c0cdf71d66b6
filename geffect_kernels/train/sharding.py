"""FSDP2 sharding of a Hugging Face causal LM: ``fully_shard`` on every decoder block, then on the root.

Each block's parameters are gathered just before it runs and freed after (forward and backward), so a
rank holds its 1/R shard of every parameter plus about one block unsharded at a time. The root (the
causal LM, under a peft wrapper when there is one) holds the rest: embedding, final norm, LM head.
On CUDA (NCCL) the blocks compute in bf16 with float32 gradient reduction; on CPU (gloo) in float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import hf


def decoder_blocks(model) -> list[nn.Module]:
    """The transformer blocks of ``model``: HF's ``_no_split_modules`` classes, else the layers ModuleList."""
    lm = hf.causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:
        base = getattr(lm, "base_model", lm)
        for attr in ("layers", "h", "blocks"):
            if isinstance(getattr(base, attr, None), nn.ModuleList):
                blocks = list(getattr(base, attr))
                break
    if not blocks:
        raise ValueError(f"cannot find the decoder blocks of {type(lm).__name__} to shard")
    return blocks


def mixed_precision_policy(device: torch.device):
    """bf16 compute with float32 gradient reduction on CUDA; None (the parameters' dtype) elsewhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model, device: torch.device):
    """Shard ``model`` in place over the default process group (per block, then the root); returns it."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(device)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for block in decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(hf.causal_lm(model), **kwargs)
    return model
