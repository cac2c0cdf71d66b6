"""Launch settings and the lean/fast choice, in one place.

Tile shapes are chosen for sm_90 (H100): 128×256 output tiles with a 64-wide reduction step for 16-bit
inputs (wgmma-sized, three pipeline stages fit in shared memory), smaller tiles for float32 inputs,
which go through three-pass tf32 (`tf32x3`) to keep float32 accuracy on tensor cores. Under the Triton
interpreter (CPU tests) small tiles keep the Python-level loop cheap.

Lean vs fast: the caller sets a budget for holding logits (`set_logits_budget` or the environment
variable GEFFECT_TRITON_LOGITS_BUDGET, in bytes; suffixes K/M/G allowed). Budget 0 (the default) is the
lean mode: four matmul-sized passes, extra memory one vocabulary chunk of the logit gradient. A positive budget
enables the fast mode (three passes) for chunks of tokens whose stored logit tiles fit in it.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

# Lean mode walks the vocabulary in chunks of the logit gradient G [N, width] (see `lean_chunk_width`).
# Memory a chunk may take without further reason.
LEAN_CHUNK_BYTES = 64 * 2**20
# Fewest columns per chunk: each chunk re-reads and re-writes the float32 dh accumulator (8·N·H bytes) next to
# the 4·N·width·H flops of its dh and dW products, a 2/width byte-per-flop ratio; at 4096 columns that is
# ~9% of those products' time at an H100's ~790 TFLOP/s over ~4.3 TB/s, independent of N.
LEAN_MIN_WIDTH = 4096
# Streaming multiprocessors assumed where no GPU can be asked (the interpreter): an H100's.
DEFAULT_SMS = 132
# The fast mode needs at least this many tokens per chunk to beat the lean mode.
FAST_MIN_ROWS = 1024

_budget: int | None = None  # None: read the environment


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _parse_bytes(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    number = text[:-1] if factor > 1 else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"GEFFECT_TRITON_LOGITS_BUDGET must be a byte count like 4G or 512M, got {text!r}") from None
    if value < 0:
        raise ValueError(f"GEFFECT_TRITON_LOGITS_BUDGET must not be negative, got {text!r}")
    return value


def set_logits_budget(n_bytes: int | None) -> None:
    """Bytes the triton backend may spend holding logit tiles (fast mode); 0 = lean (default).

    ``None`` goes back to the environment variable GEFFECT_TRITON_LOGITS_BUDGET.
    """
    global _budget
    if n_bytes is not None and (not isinstance(n_bytes, int) or n_bytes < 0):
        raise ValueError(f"logits budget must be a non-negative int (bytes) or None, got {n_bytes!r}")
    _budget = n_bytes


def logits_budget() -> int:
    if _budget is not None:
        return _budget
    return _parse_bytes(os.environ.get("GEFFECT_TRITON_LOGITS_BUDGET", "0"))


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def launch(self):
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "GROUP_M": self.group_m, "num_warps": self.num_warps, "num_stages": self.num_stages}


def matmul_tiles(dtype: torch.dtype, *, two_products: bool = False, accumulating: bool = False) -> Tiles:
    """Tiles of a matmul-shaped kernel. ``two_products``: two tile-sized values live at once (KL's two heads, fast
    mode's logits and their stored exponentials); ``accumulating``: `matmul` starting from C. Both take narrower
    tiles: the wide ones spilled registers on sm_90 (fast-mode pass 1 244 B, the bf16 dh sum 76 B)."""
    if interpreting():
        return Tiles(32, 64, 32, 1, 1, 4)
    if dtype == torch.float32:
        return Tiles(64 if two_products else 128, 128, 32, 8, 3)
    return Tiles(128, 128 if two_products or accumulating else 256, 64, 8, 3)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: three tf32 products recover float32 accuracy; 16-bit inputs are exact in any case."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def row_block(vocab: int) -> tuple[int, int]:
    """(vocabulary block, warps) for the row-wise logits kernels."""
    if interpreting():
        return 1024, 1
    return (4096, 8) if vocab >= 4096 else (max(16, 1 << (vocab - 1).bit_length()), 4)


def kl_row_tiles(vocab: int) -> tuple[int, int, int]:
    """(tokens per program, vocabulary block, warps) for the fast KL's row-wise kernel: [8, 512] float32 pieces of
    both heads' logits, 16 entries per thread and head at 8 warps."""
    block = min(1024 if interpreting() else 512, max(16, 1 << (vocab - 1).bit_length()))
    return (16, block, 1) if interpreting() else (8, block, 8)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS
