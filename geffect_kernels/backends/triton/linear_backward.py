"""Gradients through a linear head from per-token coefficients: dh, dW, db (lean mode).

With the LSE of every token known (pass 1), the vocabulary is walked in chunks of a few thousand
columns. For each chunk one kernel recomputes the logit tiles on tensor cores and turns them on chip
into G = c_t · (onehot(y_t) − softmax(z_t)) · dz/du (pass 2), stored in the input dtype for that chunk
only. Two matmuls follow: dW[chunk] = Gᵀ h, complete after one product over all tokens and written once
(pass 3), and dh += G W[chunk] into a float32 accumulator (pass 4). c_t folds any upstream ∂L/∂ℓ_t in
before the sums over tokens, so this serves the generic backward and the fused objectives alike.
"""
import torch
import triton
import triton.language as tl

from . import config
from .config import dot_precision, matmul_tiles, sm_count
from .matmul import matmul
from .tiles import add_bias, grouped_pid, product_tile, tanh


@triton.jit
def store_grad_tile(g, g_ptr, db_ptr, rows, local, cols, row_ok, col_ok, stride_g, NEED_DB: tl.constexpr):
    """Store a [BLOCK_M, BLOCK_N] gradient tile of the chunk and add its column sums to db."""
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * stride_g + local[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_ok)


@triton.jit
def token_grad_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, coef_ptr, g_ptr, db_ptr,
                      N, V, H, v_start, width, stride_h, stride_w, stride_g, softcap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_DB: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(width, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows_in = rows % N
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local < width
    cols = v_start + local
    cols_in = cols % V
    z = add_bias(product_tile(h_ptr, w_ptr, rows_in, cols_in, H, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K,
                            PRECISION), b_ptr, cols_in, HAS_BIAS)
    lse = tl.load(lse_ptr + rows_in)
    coef = tl.load(coef_ptr + rows_in)
    label = tl.load(labels_ptr + rows_in)
    onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
    if SOFTCAP:  # z = s·t and dz/du = 1 − t² from the one tile t = tanh(u/s) (z and dz/du as two tiles spilled)
        t = tanh(z / softcap)
        g = coef[:, None] * (onehot - tl.exp(softcap * t - lse[:, None])) * (1.0 - t * t)
    else:
        g = coef[:, None] * (onehot - tl.exp(z - lse[:, None]))
    store_grad_tile(g, g_ptr, db_ptr, rows, local, cols, row_ok, col_ok, stride_g, NEED_DB)


# Largest entry of a normalized 16-bit logit-gradient tile (below float16's 65504): the tile's small entries
# c_t · p then stay far above float16's smallest subnormal (6e-8) instead of flushing to zero.
GRAD_UNIT = 2.0**14


def normalized(coef, dtype):
    """(k · c, 1/k) with k = GRAD_UNIT / max |c| for 16-bit inputs, (c, None) for float32.

    The logit gradient c_t (onehot − softmax) dz/du is stored in the input dtype between the passes, and
    c_t carries w_t / n_valid: in float16 its entries c_t · p would mostly flush to zero. Stored
    as k·G instead, with the matmuls multiplying by 1/k in float32 before their store, nothing is lost
    beyond tokens whose c_t is ~1e-9 of the largest. k stays on the device (no synchronization).
    """
    if dtype == torch.float32:
        return coef, None
    top = coef.abs().amax()
    k = torch.where(top > 0, GRAD_UNIT / top.clamp_min(1e-30), 1.0)
    return (coef * k).contiguous(), (1.0 / k).reshape(1).float()


def lean_chunk_width(n_rows, vocab, hidden_size, dtype, sms):
    """Vocabulary columns per lean-mode chunk, chosen from the vocabulary and the SM count, not from a byte
    budget alone (a fixed budget shrinks the chunks as N grows: 512 columns at N 65536, the dh accumulator then
    re-read 250 times and the dW product 64 tiles for 132 SMs).

    At least what LEAN_CHUNK_BYTES holds, LEAN_MIN_WIDTH, and enough for the chunk's dW product
    (width × H, in matmul tiles) to give every SM two tiles; then as narrow as the fewest chunks of that
    width allow, in whole tiles, at most the padded V. Memory: N · width input-dtype entries (64 MiB at N 8192
    and 4096 columns; 256 MiB at N 32768).
    """
    tiles = matmul_tiles(dtype)
    block = tiles.block_n
    by_budget = config.LEAN_CHUNK_BYTES // (max(n_rows, 1) * torch.finfo(dtype).bits // 8)
    by_sms = triton.cdiv(2 * sms, triton.cdiv(hidden_size, tiles.block_n)) * tiles.block_m
    width = max(by_budget, config.LEAN_MIN_WIDTH, by_sms, block)
    blocks = triton.cdiv(vocab, block)
    return triton.cdiv(blocks, triton.cdiv(blocks * block, width)) * block


def head_grads(hidden, weight, bias, wanted, fill_chunk, unscale=None):
    """[dh, dW, db] (None where not ``wanted``) from G produced one vocabulary chunk at a time.

    ``fill_chunk(g, v_start, width, db)`` writes G[:, v_start:v_start+width] into ``g`` ([N, width]
    view) and adds its column sums to ``db`` (float32, or None); G is k times the gradient of the logits
    where ``unscale`` (1/k, from `normalized`) is given.
    """
    want_h, want_w, want_b = wanted[0], wanted[1], wanted[2] and bias is not None
    if not (want_h or want_w or want_b):
        return [None, None, None]
    n, v = hidden.shape[0], weight.shape[0]
    width = lean_chunk_width(n, v, hidden.shape[1], weight.dtype, sm_count(hidden.device))
    g = torch.empty((n, width), dtype=weight.dtype, device=hidden.device)
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if want_b else None
    dw = torch.empty_like(weight) if want_w else None
    dh = torch.empty_like(hidden) if want_h else None
    one_chunk = width >= v
    # dh sums over chunks: in float32 (the output itself for float32 inputs)
    dh_acc = dh if one_chunk or hidden.dtype == torch.float32 else torch.empty(hidden.shape, dtype=torch.float32,
                                                                               device=hidden.device)
    for v0 in range(0, v, width):
        w_here = min(width, v - v0)
        g_here = g[:, :w_here]
        fill_chunk(g_here, v0, w_here, db)
        if want_w:
            matmul(g_here.t(), hidden, dw[v0:v0 + w_here], scale=unscale)
        if want_h:
            matmul(g_here, weight[v0:v0 + w_here], dh_acc, accumulate=v0 > 0, scale=unscale)
    if want_h and dh_acc is not dh:
        dh.copy_(dh_acc)
    if db is not None and unscale is not None:
        db *= unscale
    return [dh, dw, None if db is None else db.to(bias.dtype)]


def token_grad_filler(hidden, weight, bias, labels, lse, coef, softcap):
    """fill_chunk for G = c_t (onehot − softmax) dz/du, c_t per token (0 at ignored positions)."""
    n, h = hidden.shape
    v = weight.shape[0]
    tiles = matmul_tiles(hidden.dtype)

    def fill(g, v_start, width, db):
        grid = (triton.cdiv(n, tiles.block_m) * triton.cdiv(width, tiles.block_n),)
        token_grad_kernel[grid](
            hidden, weight, weight if bias is None else bias, labels, lse, coef, g, g if db is None else db,
            n, v, h, v_start, width, hidden.stride(0), weight.stride(0), g.stride(0), softcap or 1.0,
            HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, NEED_DB=db is not None,
            PRECISION=dot_precision(hidden.dtype), **tiles.launch())

    return fill
