"""Pass 1 over a linear head: ℓ_t, the LSE per token and (optionally) the weighted coefficients.

A program owns BLOCK_M tokens and a split of consecutive vocabulary tiles; it computes each logit tile
on tensor cores, folds it into a running max / sum-of-exponentials and picks up the target logit, and
writes one partial (max, sum) per token and split. A small row-wise kernel then merges the partials into
the LSE, ℓ_t = z_t[y_t] − LSE_t and, for the fused objectives, the weight w_t(ℓ_t, ℓ_ref,t) (0 where ignored).
The N×V logits never reach global memory.
"""
import torch
import triton
import triton.language as tl

from .config import dot_precision, matmul_tiles
from .tiles import add_bias, grouped_pid, product_tile, soft_cap
from .weights import token_weight, weight_args

# Enough programs to fill an H100 (132 SMs) four times over, else fewer vocabulary tiles per program.
_TARGET_PROGRAMS = 4 * 132
_MAX_TILES_PER_SPLIT = 8


@triton.jit
def lse_partials_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_max_ptr, part_sum_ptr, target_ptr,
                        exp_ptr, tile_max_ptr, N, V, H, stride_h, stride_w, stride_e, stride_t,
                        tiles_per_split, n_splits, softcap,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, STORE_EXP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """Per split: running max and sum of exp over its tiles, and the target logit where it lies there.

    STORE_EXP (fast mode) also keeps, per tile, exp(z − tile max) in the input dtype and the tile max in
    float32: relative precision of every entry, so the logit gradient can later be formed from them.
    """
    pid_m, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), n_splits, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows_in = rows % N  # clamped: padding rows compute garbage that is never stored
    label = tl.load(labels_ptr + rows_in)
    # finite start: a tile wholly past V (end of the last split) then adds exactly 0
    m = tl.full((BLOCK_M,), -3.0e38, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    first_tile = pid_s * tiles_per_split
    first_col = first_tile * BLOCK_N
    for t in range(0, tiles_per_split):
        cols = first_col + t * BLOCK_N + tl.arange(0, BLOCK_N)
        z = add_bias(product_tile(h_ptr, w_ptr, rows_in, cols % V, H, stride_h, stride_w,
                                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION), b_ptr, cols % V, HAS_BIAS)
        if SOFTCAP:
            z, _ = soft_cap(z, softcap)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        # the target logit first: z is then dead once e exists (two live 128×256 tiles would spill)
        target += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        tile_max = tl.maximum(tl.max(z, axis=1), -3.0e38)
        e = tl.exp(z - tile_max[:, None])
        if STORE_EXP:
            r64 = rows.to(tl.int64)
            tl.store(exp_ptr + r64[:, None] * stride_e + cols[None, :], e.to(exp_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols[None, :] < V))
            tile_ok = first_col + t * BLOCK_N < V
            tl.store(tile_max_ptr + r64 * stride_t + first_tile + t, tile_max, mask=row_ok & tile_ok)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(e, axis=1) * tl.exp(tile_max - m_new)
        m = m_new
    out = pid_s * N + rows
    tl.store(part_max_ptr + out, m, mask=row_ok)
    tl.store(part_sum_ptr + out, s, mask=row_ok)
    last_col = first_col + tiles_per_split * BLOCK_N
    tl.store(target_ptr + rows, target, mask=row_ok & (label >= first_col) & (label < last_col))


@triton.jit
def combine_kernel(part_max_ptr, part_sum_ptr, target_ptr, labels_ptr, ref_ptr, lp_ptr, lse_ptr, coef_ptr,
                   N, n_splits, ignore_index, alpha, beta, gamma, eps,
                   KIND: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    m = tl.load(part_max_ptr + rows, mask=ok, other=0.0)
    s = tl.load(part_sum_ptr + rows, mask=ok, other=1.0)
    for i in range(1, n_splits):
        m_i = tl.load(part_max_ptr + i * N + rows, mask=ok, other=0.0)
        s_i = tl.load(part_sum_ptr + i * N + rows, mask=ok, other=1.0)
        m_new = tl.maximum(m, m_i)
        s = s * tl.exp(m - m_new) + s_i * tl.exp(m_i - m_new)
        m = m_new
    lse = m + tl.log(s)
    valid = tl.load(labels_ptr + rows, mask=ok, other=ignore_index) != ignore_index
    lp = tl.where(valid, tl.load(target_ptr + rows, mask=ok, other=0.0) - lse, 0.0)
    tl.store(lp_ptr + rows, lp, mask=ok)
    tl.store(lse_ptr + rows, lse, mask=ok)
    if KIND >= 0:
        ref = tl.load(ref_ptr + rows, mask=ok, other=0.0).to(tl.float32) if HAS_REF else lp
        w = token_weight(lp, ref, alpha, beta, gamma, eps, KIND)
        tl.store(coef_ptr + rows, tl.where(valid, w, 0.0), mask=ok)


def forward_tile_width(dtype):
    """Vocabulary columns per logit tile of fast mode's pass 1 (the granularity of stored tile maxima)."""
    return matmul_tiles(dtype, two_products=True).block_n


def vocab_splits(n_row_blocks, n_col_tiles):
    per = min(_MAX_TILES_PER_SPLIT, max(1, n_row_blocks * n_col_tiles // _TARGET_PROGRAMS))
    return per, triton.cdiv(n_col_tiles, per)


def merge_partials(part_max, part_sum, target, labels, ref, *, ignore_index, weighting):
    """ℓ_t, LSE_t and (with a weighting) w_t from per-split partial maxima and sums."""
    n = labels.shape[0]
    lp = torch.empty(n, dtype=torch.float32, device=labels.device)
    lse = torch.empty_like(lp)
    coef = torch.empty_like(lp) if weighting is not None else lp
    block = 1024 if n >= 1024 else max(16, triton.next_power_of_2(n))
    combine_kernel[(triton.cdiv(n, block),)](
        part_max, part_sum, target, labels, lp if ref is None else ref, lp, lse, coef,
        n, part_max.shape[0], ignore_index, **weight_args(weighting), HAS_REF=ref is not None,
        BLOCK=block)
    return lp, lse, (coef if weighting is not None else None)


def head_logprobs(hidden, weight, bias, labels, ref=None, *, ignore_index, softcap, weighting=None,
                  exps=None, tile_max=None):
    """(ℓ [N], LSE [N], w [N] or None), float32, for hidden [N, H] over the head weight [V, H] (+ bias).

    With ``exps`` ([N, ≥V], input dtype) and ``tile_max`` ([N, ⌈V / tile⌉] float32) given, the kernel
    also stores exp(z − tile max) and the tile maxima there (fast mode; see `forward_tile_width`).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    tiles = matmul_tiles(hidden.dtype, two_products=exps is not None)  # with exps: two tiles live (spills)
    n_m = triton.cdiv(n, tiles.block_m)
    per, n_splits = vocab_splits(n_m, triton.cdiv(v, tiles.block_n))
    part_max = torch.empty((n_splits, n), dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    target = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse_partials_kernel[(n_m * n_splits,)](
        hidden, weight, weight if bias is None else bias, labels, part_max, part_sum, target,
        target if exps is None else exps, target if tile_max is None else tile_max,
        n, v, h, hidden.stride(0), weight.stride(0), 0 if exps is None else exps.stride(0),
        0 if tile_max is None else tile_max.stride(0), per, n_splits, softcap or 1.0,
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, STORE_EXP=exps is not None,
        PRECISION=dot_precision(hidden.dtype),
        **tiles.launch())
    return merge_partials(part_max, part_sum, target, labels, ref, ignore_index=ignore_index,
                          weighting=weighting)
