"""Fast mode for the fused objectives: three matmul-sized passes, logit tiles held per chunk of tokens.

Pass 1 (`head_logprobs` with storage) keeps exp(z − tile max) in the input dtype and the tile maxima
in float32 for a chunk of tokens, next to the LSE. Once the LSE is known a row-wise kernel turns them in
place into G = c_t (onehot − e·exp(tile max − LSE)) dz/du — every entry keeps its relative precision,
unlike bf16 logits, whose rounding grows with |z|. Then dh[chunk] = G W (complete, K = V) and
dW (+)= Gᵀ h[chunk]; with more than one chunk dW is summed in float32, and that buffer counts
against the budget.
"""
import torch
import triton
import triton.language as tl

from . import config
from .linear_backward import normalized
from .linear_forward import forward_tile_width, head_logprobs
from .matmul import matmul

_ROWS = 16  # tokens per program of the row-wise conversion


@triton.jit
def exp_to_grad_kernel(e_ptr, tile_max_ptr, labels_ptr, lse_ptr, coef_ptr, db_ptr, N, V, stride_e, stride_t,
                       softcap, SOFTCAP: tl.constexpr, NEED_DB: tl.constexpr, ROWS: tl.constexpr,
                       TILE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    cols = tile * TILE + tl.arange(0, TILE)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < V)
    r64 = rows.to(tl.int64)
    ptrs = e_ptr + r64[:, None] * stride_e + cols[None, :]
    e = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tile_max = tl.load(tile_max_ptr + r64 * stride_t + tile, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    p = e * tl.exp(tile_max - lse)[:, None]
    g = coef[:, None] * (tl.where(cols[None, :] == label[:, None], 1.0, 0.0) - p)
    if SOFTCAP:  # dz/du = 1 − (z/s)², z recovered from the stored entry (0 where it underflowed)
        z = tile_max[:, None] + tl.log(e)
        g = g * tl.where(e > 0, 1.0 - (z / softcap) * (z / softcap), 0.0)
    g = tl.where(mask, g, 0.0)
    tl.store(ptrs, g.to(e_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cols < V)


def padded_width(v):
    return triton.cdiv(v, 64) * 64  # 128-byte aligned rows for the matmul loads


def rows_within(budget, n, weight, per_row):
    """Tokens per chunk when each takes ``per_row`` bytes of the budget, or 0 for the lean mode. With more than one
    chunk a 16-bit dW is summed in a float32 buffer, which counts against the budget too."""
    if budget <= 0 or n == 0:
        return 0
    rows = min(n, budget // per_row)
    if rows < n and weight.dtype != torch.float32:
        rows = min(n, max(0, budget - weight.numel() * 4) // per_row)
    return rows if rows >= min(config.FAST_MIN_ROWS, n) else 0


def fast_rows(hidden, weight, budget):
    """Tokens per chunk the budget allows in fast mode, or 0 for the lean mode."""
    v = weight.shape[0]
    per_row = padded_width(v) * weight.element_size() + triton.cdiv(v, forward_tile_width(hidden.dtype)) * 4
    return rows_within(budget, hidden.shape[0], weight, per_row)


def dw_accumulator(dw, n_chunks):
    """Where dW is summed over token chunks: dW itself for one chunk or float32 weights, else a float32 buffer."""
    if dw is None or n_chunks == 1 or dw.dtype == torch.float32:
        return dw
    return torch.empty(dw.shape, dtype=torch.float32, device=dw.device)


def chunk_products(g, weight, h_part, dh_part, dw_acc, first, unscale):
    """dh[chunk] = G W (complete: K = V) and dW (+)= Gᵀ h[chunk] (summed from the second chunk on)."""
    if dh_part is not None:
        matmul(g, weight, dh_part, scale=unscale)
    if dw_acc is not None:
        matmul(g.t(), h_part, dw_acc, accumulate=not first, scale=unscale)


def fast_head_grads(hidden, weight, bias, labels, ref, wanted, rows, *, ignore_index, softcap, weighting, scale):
    """(loss, [dh, dW, db]) of scale · Σ_t w_t ℓ_t in chunks of ``rows`` tokens (``scale``: a number or a
    device scalar). Each chunk's G is stored normalized (`normalized`); the matmuls undo it."""
    n, v = hidden.shape[0], weight.shape[0]
    tile = forward_tile_width(hidden.dtype)
    want_h, want_w, want_b = wanted[0], wanted[1], wanted[2] and bias is not None
    exps = torch.empty((rows, padded_width(v)), dtype=weight.dtype, device=hidden.device)
    tile_max = torch.empty((rows, triton.cdiv(v, tile)), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if want_h else None
    dw = torch.empty_like(weight) if want_w else None
    dw_acc = dw_accumulator(dw, triton.cdiv(n, rows))
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if want_b else None
    db_chunk = torch.empty_like(db) if db is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h_part, lab = hidden[r0:r1], labels[r0:r1]
        lp, lse, w = head_logprobs(h_part, weight, bias, lab, None if ref is None else ref[r0:r1],
                                   ignore_index=ignore_index, softcap=softcap, weighting=weighting,
                                   exps=exps, tile_max=tile_max)
        coef = w * scale
        loss += (coef * lp).sum()
        coef, unscale = normalized(coef, hidden.dtype)
        if db_chunk is not None:
            db_chunk.zero_()
        g = exps[:r1 - r0, :v]
        exp_to_grad_kernel[(triton.cdiv(r1 - r0, _ROWS), tile_max.shape[1])](
            g, tile_max, lab, lse, coef, db_chunk if db_chunk is not None else lse, r1 - r0, v, g.stride(0),
            tile_max.stride(0), softcap or 1.0, SOFTCAP=softcap is not None, NEED_DB=db is not None, ROWS=_ROWS,
            TILE=tile, num_warps=4)
        if db is not None:
            db += db_chunk if unscale is None else db_chunk * unscale
        chunk_products(g, weight, h_part, dh[r0:r1] if want_h else None, dw_acc, r0 == 0, unscale)
    if dw_acc is not dw:
        dw.copy_(dw_acc)
    return loss, [dh, dw, None if db is None else db.to(bias.dtype)]
