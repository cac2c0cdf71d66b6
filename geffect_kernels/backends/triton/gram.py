"""The Gram ("ghost") inner product on tensor cores: Σ_ij (G_a G_bᵀ)_ij (X_a X_bᵀ)_ij (DESIGN §4).

A program owns a BLOCK_A × BLOCK_B tile of the i, j grid. Both Gram tiles come from `tl.dot` (wgmma on Hopper)
over d_out and d_in, in float32 accumulators; their elementwise product is reduced per row i and written as one
float32 partial per (row i, column block): neither Gram matrix reaches memory, and the partials are summed in
float64 (per segment of rows i for per-instance sums). Same contract as the csrc `ghost_inner_product`, whose
CUDA kernel builds the tiles on CUDA cores; `ghost.fastest_gram` picks between them by measured time.
"""
import contextlib

import torch
import triton
import triton.language as tl

from .config import dot_precision, interpreting
from .tiles import product_tile


@triton.jit
def gram_kernel(ga_ptr, xa_ptr, gb_ptr, xb_ptr, part_ptr, NA, NB, DOUT, DIN, stride_ga, stride_xa, stride_gb,
                stride_xb, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """part[pid_b, i] = Σ_{j in column block pid_b} (G_a G_bᵀ)_ij (X_a X_bᵀ)_ij."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    rows_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    gram_g = product_tile(ga_ptr, gb_ptr, rows_a % NA, rows_b % NB, DOUT, stride_ga, stride_gb, BLOCK_A, BLOCK_B,
                        BLOCK_K, PRECISION)
    gram_x = product_tile(xa_ptr, xb_ptr, rows_a % NA, rows_b % NB, DIN, stride_xa, stride_xb, BLOCK_A, BLOCK_B,
                        BLOCK_K, PRECISION)
    both = tl.where(rows_b[None, :] < NB, gram_g * gram_x, 0.0)
    tl.store(part_ptr + pid_b.to(tl.int64) * NA + rows_a, tl.sum(both, axis=1), mask=rows_a < NA)


def gram_tiles(dtype):
    """(BLOCK_A, BLOCK_B, BLOCK_K, num_warps, num_stages): two 128×128 float32 accumulators live at once."""
    if interpreting():
        return 16, 32, 32, 1, 1
    if dtype == torch.float32:
        return 64, 128, 32, 8, 3
    return 128, 128, 64, 8, 3


def gram_inner_product(grad_a, input_a, grad_b, input_b, segment_ids=None, num_segments=None):
    """`ghost_inner_product` on tensor cores: float64 result (``[num_segments]`` with ``segment_ids``).

    Inputs already checked by the caller (2-D, one float16/bfloat16/float32 dtype and device, matching sizes).
    """
    ga, xa, gb, xb = (t if t.stride(-1) == 1 else t.contiguous() for t in (grad_a, input_a, grad_b, input_b))
    na, nb = ga.shape[0], gb.shape[0]
    block_a, block_b, block_k, warps, stages = gram_tiles(ga.dtype)
    part = torch.empty((triton.cdiv(nb, block_b), na), dtype=torch.float32, device=ga.device)
    if na and nb:
        with torch.cuda.device(ga.device) if ga.is_cuda else contextlib.nullcontext():
            gram_kernel[(triton.cdiv(na, block_a), triton.cdiv(nb, block_b))](
                ga, xa, gb, xb, part, na, nb, ga.shape[1], xa.shape[1], ga.stride(0), xa.stride(0), gb.stride(0),
                xb.stride(0), BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k,
                PRECISION=dot_precision(ga.dtype), num_warps=warps, num_stages=stages)
    rows = part.double().sum(0) if nb else torch.zeros(na, dtype=torch.float64, device=ga.device)
    if segment_ids is None:
        return rows.sum()
    return torch.zeros(num_segments, dtype=torch.float64, device=ga.device).index_add_(0, segment_ids, rows)
