"""C (+)= A · B with float32 accumulation on chip, for the dh and dW products of the backward.

Any strides (a transposed operand is just swapped strides). With ACCUMULATE the float32 tile already
in C is added (the accumulator starts from it), which lets dh be summed over vocabulary chunks in a float32 buffer;
without it C is written once, in its own dtype (dW of a vocabulary chunk is complete after one product
over all tokens, so it goes straight into the weight's dtype). The product is multiplied by a float32 device
scalar before that (`scale_ptr`): the undoing of a 16-bit operand's normalization (see `normalized`).
"""
import torch
import triton
import triton.language as tl

from .config import dot_precision, matmul_tiles
from .tiles import grouped_pid


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  stride_cm, stride_cn,
                  ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # 64-bit scalar tile origins, 32-bit offsets inside a tile: either operand may be contiguous along M
    # or N, and the compiler sees contiguity (vector loads, async pipelining) only in 32-bit index vectors
    # that are neither wrapped (modulo) nor widened; edges are masked instead
    first_m = pid_m.to(tl.int64) * BLOCK_M
    first_n = pid_n.to(tl.int64) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m[:, None] < M - first_m
    col_ok = offs_n[None, :] < N - first_n
    a_ptrs = a_ptr + first_m * stride_am + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + first_n * stride_bn + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    c_ptrs = (c_ptr + first_m * stride_cm + first_n * stride_cn
              + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn)
    mask = row_ok & col_ok
    scale = tl.load(scale_ptr)
    if ACCUMULATE:  # start from C / scale: C is then never a second tile beside the accumulator (that spilled)
        acc = tl.load(c_ptrs, mask=mask, other=0.0) / scale
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_ok & (offs_k[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k) & col_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * scale
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def matmul(a, b, out, *, accumulate=False, scale=None):
    """out (+)= scale · a @ b for 2-D tensors of any strides; ``accumulate`` needs a float32 ``out``; ``scale``
    a float32 device tensor of one element (None: 1)."""
    m, k = a.shape
    n = b.shape[1]
    tiles = matmul_tiles(a.dtype, accumulating=accumulate)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    if scale is None:
        scale = torch.ones(1, dtype=torch.float32, device=out.device)
    matmul_kernel[grid](a, b, out, scale, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        out.stride(0), out.stride(1), ACCUMULATE=accumulate,
                        PRECISION=dot_precision(a.dtype), **tiles.launch())
    return out
