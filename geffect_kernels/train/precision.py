"""Half-precision weights in a training run: the trained parameters are float32, the compute is half.

A model loaded in bfloat16 or float16 (``geffect train --dtype``) keeps its frozen weights in that dtype. Its
trainable parameters (LoRA adapters, or every weight in full fine-tuning) are made float32 in place before the
optimizer is built, so AdamW updates float32 master weights: an update far below a bf16 weight's spacing (2⁻⁸ of
it) would otherwise round away. The forward runs under autocast to the half dtype, on the CPU too; on CUDA the
loop computes in bf16 whatever the weights.
"""
from __future__ import annotations

import torch

HALF = (torch.bfloat16, torch.float16)


def float32_masters(model) -> torch.dtype | None:
    """Make ``model``'s trainable half-precision parameters float32 (in place); the half dtype its weights were
    stored in (bfloat16 when both are), or None when none was half."""
    found = {p.dtype for p in model.parameters() if p.dtype in HALF}
    for param in model.parameters():
        if param.requires_grad and param.dtype in HALF:
            param.data = param.data.float()
    if not found:
        return None
    return torch.bfloat16 if torch.bfloat16 in found else torch.float16


def compute_autocast(device: torch.device, half: torch.dtype | None):
    """The autocast of a run's forward passes: bf16 (or the weights' half dtype) on CUDA, the weights' half dtype
    on the CPU, none for float32 or float64 weights on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=half or torch.bfloat16)
    return torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None)
