"""token_stats over a linear head in one pass: ℓ_t, the entropy of p_t and Var_{p_t}[log p_t] per token.

Laid out as the log-likelihood's pass 1 (`linear_forward`): a program owns BLOCK_M tokens and a split of
consecutive vocabulary tiles and computes each logit tile on tensor cores. Each tile is summarized per token by
its max, Σ e^{z−max}, its mean relative to the max and the squared deviations about that mean, and merged into
the running summary as in Chan et al.'s parallel variance (csrc/include/geffect/moments.h has the same merge):
no variance is a difference of raw moments, and no entropy near 0 a difference of logit-sized numbers. One
summary per token and split goes to global memory, and a row-wise kernel merges the splits. The N×V logits
never reach global memory.
"""
import torch
import triton
import triton.language as tl

from .config import dot_precision, matmul_tiles
from .linear_forward import vocab_splits
from .tiles import add_bias, grouped_pid, product_tile, soft_cap

@triton.jit
def merge_moments(m_a, s_a, mean_a, m2_a, m_b, s_b, mean_b, m2_b):
    """Merge two summaries (max, Σ e^{z−max}, E[z] − max, Σ e^{z−max}(z − E[z])²) of row pieces; either may be
    empty (sum 0)."""
    m = tl.maximum(m_a, m_b)
    r_a = tl.exp(m_a - m)
    r_b = tl.exp(m_b - m)
    w_a = s_a * r_a
    w_b = s_b * r_b
    s = w_a + w_b
    inv = 1.0 / tl.where(s > 0, s, 1.0)
    # both means relative to the new max (≤ 0); an empty piece's mean is 0, so its far-off max adds nothing
    mean_a = tl.where(s_a > 0, mean_a + (m_a - m), 0.0)
    mean_b = tl.where(s_b > 0, mean_b + (m_b - m), 0.0)
    delta = mean_b - mean_a
    mean = (w_a * inv) * mean_a + (w_b * inv) * mean_b  # two numbers of one sign: nothing cancels
    m2 = m2_a * r_a + m2_b * r_b + delta * delta * w_a * (w_b * inv)
    return m, s, mean, m2


@triton.jit
def stats_partials_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_max_ptr, part_sum_ptr, part_mean_ptr, part_m2_ptr,
                          target_ptr, N, V, H, stride_h, stride_w, tiles_per_split, n_splits, softcap,
                          HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """Per split: the summary of its tiles for each token, and the target logit where it lies there."""
    pid_m, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), n_splits, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows_in = rows % N  # clamped: padding rows compute garbage that is never stored
    label = tl.load(labels_ptr + rows_in)
    m = tl.full((BLOCK_M,), -3.0e38, tl.float32)  # the max of an empty piece: finite, so differences stay finite
    s = tl.zeros((BLOCK_M,), tl.float32)
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    first_col = pid_s * tiles_per_split * BLOCK_N
    for t in range(0, tiles_per_split):
        cols = first_col + t * BLOCK_N + tl.arange(0, BLOCK_N)
        z = add_bias(product_tile(h_ptr, w_ptr, rows_in, cols % V, H, stride_h, stride_w,
                                  BLOCK_M, BLOCK_N, BLOCK_K, PRECISION), b_ptr, cols % V, HAS_BIAS)
        if SOFTCAP:
            z, _ = soft_cap(z, softcap)
        col_ok = cols[None, :] < V
        target += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        # a tile wholly past V (end of the last split) is empty: sum 0
        tile_max = tl.max(tl.where(col_ok, z, -3.0e38), axis=1)
        x = tl.where(col_ok, z - tile_max[:, None], 0.0)  # ≤ 0
        e = tl.where(col_ok, tl.exp(x), 0.0)
        tile_sum = tl.sum(e, axis=1)
        tile_mean = tl.sum(e * x, axis=1) / tl.maximum(tile_sum, 1.0)  # the sum is ≥ 1 unless empty
        d = x - tile_mean[:, None]
        tile_m2 = tl.sum(e * d * d, axis=1)
        m, s, mean, m2 = merge_moments(m, s, mean, m2, tile_max, tile_sum, tile_mean, tile_m2)
    out = pid_s * N + rows
    tl.store(part_max_ptr + out, m, mask=row_ok)
    tl.store(part_sum_ptr + out, s, mask=row_ok)
    tl.store(part_mean_ptr + out, mean, mask=row_ok)
    tl.store(part_m2_ptr + out, m2, mask=row_ok)
    last_col = first_col + tiles_per_split * BLOCK_N
    tl.store(target_ptr + rows, target, mask=row_ok & (label >= first_col) & (label < last_col))


@triton.jit
def stats_combine_kernel(part_max_ptr, part_sum_ptr, part_mean_ptr, part_m2_ptr, target_ptr, labels_ptr,
                         lp_ptr, entropy_ptr, var_ptr, N, n_splits, ignore_index, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    m = tl.load(part_max_ptr + rows, mask=ok, other=0.0)
    s = tl.load(part_sum_ptr + rows, mask=ok, other=1.0)
    mean = tl.load(part_mean_ptr + rows, mask=ok, other=0.0)
    m2 = tl.load(part_m2_ptr + rows, mask=ok, other=0.0)
    for i in range(1, n_splits):
        at = i * N + rows
        m, s, mean, m2 = merge_moments(m, s, mean, m2, tl.load(part_max_ptr + at, mask=ok, other=0.0),
                                       tl.load(part_sum_ptr + at, mask=ok, other=1.0),
                                       tl.load(part_mean_ptr + at, mask=ok, other=0.0),
                                       tl.load(part_m2_ptr + at, mask=ok, other=0.0))
    log_s = tl.log(s)
    valid = tl.load(labels_ptr + rows, mask=ok, other=ignore_index) != ignore_index
    target = tl.load(target_ptr + rows, mask=ok, other=0.0)
    tl.store(lp_ptr + rows, tl.where(valid, target - (m + log_s), 0.0), mask=ok)
    tl.store(entropy_ptr + rows, tl.where(valid, log_s - mean, 0.0), mask=ok)
    tl.store(var_ptr + rows, tl.where(valid, m2 / s, 0.0), mask=ok)


def head_token_stats(hidden, weight, bias, labels, *, ignore_index, softcap):
    """(ℓ, entropy, Var_p[log p]), each float32 [N], for hidden [N, H] over the head weight [V, H] (+ bias)."""
    n, h = hidden.shape
    v = weight.shape[0]
    tiles = matmul_tiles(hidden.dtype, two_products=True)  # the logit tile and its exponentials live at once
    n_m = triton.cdiv(n, tiles.block_m)
    per, n_splits = vocab_splits(n_m, triton.cdiv(v, tiles.block_n))
    parts = torch.empty((4, n_splits, n), dtype=torch.float32, device=hidden.device)
    target = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    stats_partials_kernel[(n_m * n_splits,)](
        hidden, weight, weight if bias is None else bias, labels, *parts, target,
        n, v, h, hidden.stride(0), weight.stride(0), per, n_splits, softcap or 1.0,
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, PRECISION=dot_precision(hidden.dtype),
        **tiles.launch())
    out = torch.empty((3, n), dtype=torch.float32, device=hidden.device)
    block = 1024 if n >= 1024 else max(16, triton.next_power_of_2(n))
    stats_combine_kernel[(triton.cdiv(n, block),)](*parts, target, labels, *out, n, n_splits, ignore_index,
                                                   BLOCK=block)
    return tuple(out)
