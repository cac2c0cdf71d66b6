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

from .config import LEAN_CHUNK_BYTES, dot_precision, matmul_tiles
from .matmul import matmul
from .tiles import add_bias, grouped_pid, logit_tile, soft_cap


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
    z = add_bias(logit_tile(h_ptr, w_ptr, rows_in, cols_in, H, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K,
                            PRECISION), b_ptr, cols_in, HAS_BIAS)
    if SOFTCAP:
        z, dz = soft_cap(z, softcap)
    lse = tl.load(lse_ptr + rows_in)
    coef = tl.load(coef_ptr + rows_in)
    label = tl.load(labels_ptr + rows_in)
    g = coef[:, None] * (tl.where(cols[None, :] == label[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
    if SOFTCAP:
        g = g * dz
    store_grad_tile(g, g_ptr, db_ptr, rows, local, cols, row_ok, col_ok, stride_g, NEED_DB)


def chunk_width(n_rows, vocab, dtype, budget=LEAN_CHUNK_BYTES):
    """Vocabulary columns per chunk: the chunk's G fits ``budget`` (at least one tile, at most V)."""
    block = matmul_tiles(dtype).block_n
    width = budget // (max(n_rows, 1) * torch.finfo(dtype).bits // 8) // block * block
    return min(max(width, block), triton.cdiv(vocab, block) * block)


def head_grads(hidden, weight, bias, wanted, fill_chunk):
    """[dh, dW, db] (None where not ``wanted``) from G produced one vocabulary chunk at a time.

    ``fill_chunk(g, v_start, width, db)`` writes G[:, v_start:v_start+width] into ``g`` ([N, width]
    view) and adds its column sums to ``db`` (float32, or None).
    """
    want_h, want_w, want_b = wanted[0], wanted[1], wanted[2] and bias is not None
    if not (want_h or want_w or want_b):
        return [None, None, None]
    n, v = hidden.shape[0], weight.shape[0]
    width = chunk_width(n, v, weight.dtype)
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
            matmul(g_here.t(), hidden, dw[v0:v0 + w_here])
        if want_h:
            matmul(g_here, weight[v0:v0 + w_here], dh_acc, accumulate=v0 > 0)
    if want_h and dh_acc is not dh:
        dh.copy_(dh_acc)
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
