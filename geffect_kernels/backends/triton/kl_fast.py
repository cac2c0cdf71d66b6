"""Fast mode for the fused KL: four matmul-sized passes, both heads' logits held per chunk of tokens.

Per chunk of tokens: u = h Wᵀ and u_ref = h_ref W_refᵀ (two matmuls, float32 out), then one row-wise kernel
(`kl_rows_kernel`) reads both rows twice — once for the two LSEs and KL_t = T/Σexp(zr − m_r) + LSE_θ − LSE_ref
(as in the lean pass 1), once to write G = k·c_t (p_θ − p_ref) dz/du over the θ logits, in the input dtype
(`normalized`: k undone in the matmuls) — then dh[chunk] = G W and dW (+)= Gᵀ h[chunk] (two matmuls). The lean
mode needs six (both tiles in pass 1, both again in the gradient pass, dW, dh).

Precision: both heads' logits are stored in float32, exactly as the matmul accumulated them, bias and soft-cap
applied on chip. Stored in a 16-bit type they would be rounded before the softmax by up to 2⁻⁸|z| (bf16), and
p_θ − p_ref, a difference of nearly equal numbers when the heads are close (the KL retain term's usual case),
would lose that much relative to p: at |z| ~ 5 and heads 1e-2 apart that is ~1 relative in G. The float32 logits
give the lean mode's accuracy (float32 rounding of z only); G itself is stored in the input dtype, as in the
lean mode.

Memory: rows · 8 · V̄ bytes (two float32 logit rows, V̄ = V padded to 64; G overwrites the θ row), plus, with
more than one chunk and 16-bit weights, the float32 dW accumulator (4 · V · H). At N 8192, V 128256 one chunk
is 7.8 GiB (`fast_kl_rows` sizes chunks from the caller's logits budget). Expected time against Liger's fused
linear JSD (an estimate from pass counts and memory traffic, not a measurement): DESIGN §6.
"""
import torch
import triton
import triton.language as tl

from .config import kl_row_tiles
from .fast_path import chunk_products, dw_accumulator, padded_width, rows_within
from .matmul import matmul
from .tiles import add_bias, online_lse, reference_fold, soft_cap, target_fold

KL = tl.constexpr(0)  # the TARGET codes of `kl` (imported from there would be circular)
SHIFTED = tl.constexpr(1)
OWN = tl.constexpr(2)


@triton.jit
def _row_logits(u_ptrs, b_ptr, cols_in, mask, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """(z, dz/du) of a [ROWS, BLOCK] piece of stored logits u (0 where masked): bias added, soft-capped."""
    z = add_bias(tl.load(u_ptrs, mask=mask, other=0.0), b_ptr, cols_in, HAS_BIAS)
    dz = tl.full(z.shape, 1.0, tl.float32)
    if SOFTCAP:
        z, dz = soft_cap(z, softcap)
    return z, dz


@triton.jit
def _target_logits(ur_rows, br_ptr, cols, cols_in, mask, softcap, z, label, beta, HAS_REF_BIAS: tl.constexpr,
                   SOFTCAP: tl.constexpr, TARGET: tl.constexpr):
    """The target's logits for a piece of rows: the reference's (KL), shifted by −β at the label (SHIFTED), or θ's
    ``z`` with −∞ at the label (OWN: nothing read)."""
    if TARGET == OWN:
        zr = tl.where(cols[None, :] == label[:, None], float("-inf"), z)
    else:
        zr, _ = _row_logits(ur_rows + cols[None, :], br_ptr, cols_in, mask, softcap, HAS_REF_BIAS, SOFTCAP)
        if TARGET == SHIFTED:
            zr = tl.where(cols[None, :] == label[:, None], zr - beta, zr)
    return zr


@triton.jit
def kl_rows_kernel(u_ptr, ur_ptr, g_ptr, b_ptr, br_ptr, labels_ptr, coef_ptr, kl_ptr, db_ptr, N, V, stride_u,
                   stride_g, softcap, beta, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                   TARGET: tl.constexpr, NEED_DB: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """KL_t (CE_t for a cross-entropy TARGET, `kl`) of ROWS tokens and their logit gradient G (``g_ptr``: the θ
    logits' memory, in the input dtype).

    A row of G lies over the first half (16-bit) or the whole (float32) of the same row of u, so a block of G
    covers only columns of u that this program has already read; the barrier makes every warp's reads of the
    block land before any warp writes over them.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    u_rows = u_ptr + r64[:, None] * stride_u
    ur_rows = ur_ptr + r64[:, None] * stride_u
    if TARGET == KL:
        label = tl.full((ROWS,), -1, tl.int64)
    else:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((ROWS,), -3.0e38, tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    m_r = tl.full((ROWS,), -3.0e38, tl.float32)
    s_r = tl.zeros((ROWS,), tl.float32)
    t_r = tl.zeros((ROWS,), tl.float32)
    a_r = tl.zeros((ROWS,), tl.float32)
    z_y = tl.zeros((ROWS,), tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        col_ok = cols[None, :] < V
        mask = row_ok[:, None] & col_ok  # padding rows read as zeros: finite, never stored
        z, _ = _row_logits(u_rows + cols[None, :], b_ptr, cols % V, mask, softcap, HAS_BIAS, SOFTCAP)
        zr = _target_logits(ur_rows, br_ptr, cols, cols % V, mask, softcap, z, label, beta, HAS_REF_BIAS, SOFTCAP,
                            TARGET)
        m, s = online_lse(m, s, tl.where(col_ok, z, float("-inf")))
        if TARGET == KL:
            m_r, s_r, t_r = reference_fold(m_r, s_r, t_r, tl.where(col_ok, zr, float("-inf")),
                                           tl.where(col_ok, zr - z, 0.0))
        else:
            diff = tl.zeros(z.shape, tl.float32) if TARGET == OWN else tl.where(col_ok, zr - z, 0.0)
            if TARGET == OWN:  # ℓ_y for OWN's gradient
                z_y += tl.sum(tl.where((cols[None, :] == label[:, None]) & col_ok, z, 0.0), axis=1)
            m_r, s_r, t_r, a_r = target_fold(m_r, s_r, t_r, a_r, tl.where(col_ok, zr, float("-inf")), diff)
    lse = m + tl.log(s)
    lse_r = m_r + tl.log(s_r)
    value = t_r / s_r + lse - lse_r
    if TARGET != KL:
        value += tl.log(s_r) - a_r / s_r  # the target's entropy
    tl.store(kl_ptr + rows, value, mask=row_ok)
    lp = z_y - lse
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    g_rows = g_ptr + r64[:, None] * stride_g
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols[None, :] < V)
        z, dz = _row_logits(u_rows + cols[None, :], b_ptr, cols % V, mask, softcap, HAS_BIAS, SOFTCAP)
        if TARGET == OWN:  # p_y at the label, −q_v p_y elsewhere (`kl.own_target_grad`)
            off = -tl.exp(z - lse_r[:, None] + lp[:, None])
            diff_p = tl.where(cols[None, :] == label[:, None], tl.exp(z - lse[:, None]), off)
            diff_p = tl.where(label[:, None] >= 0, diff_p, 0.0)
        else:
            zr = _target_logits(ur_rows, br_ptr, cols, cols % V, mask, softcap, z, label, beta, HAS_REF_BIAS, SOFTCAP,
                                TARGET)
            diff_p = tl.exp(z - lse[:, None]) - tl.exp(zr - lse_r[:, None])
        g = tl.where(mask, coef[:, None] * diff_p * dz, 0.0)
        tl.debug_barrier()
        tl.store(g_rows + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cols < V)


def fast_kl_rows(hidden, weight, budget, own=False):
    """Tokens per chunk the logits budget allows the fast KL (two float32 logit rows each; one for a target that is
    θ's own), or 0 for lean."""
    return rows_within(budget, hidden.shape[0], weight, (4 if own else 8) * padded_width(weight.shape[0]))


def fast_kl_grads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, coef, unscale, wanted, softcap, rows, *,
                  labels=None, beta=0.0, target=0):
    """(KL_t [N] float32, [dh, dW, db]) in chunks of ``rows`` tokens; ``coef``: k · c_t per token (0 where
    ignored), ``unscale``: 1/k or None (`normalized`), ``wanted``: which of dh, dW, db. With ``target`` a
    cross-entropy TARGET of `kl`: CE_t, ``labels`` −1 where ignored (OWN: no reference logits formed)."""
    n, v = hidden.shape[0], weight.shape[0]
    want_h, want_w, want_b = wanted[0], wanted[1], wanted[2] and bias is not None
    device = hidden.device
    own = target == OWN.value
    logits = torch.empty((1 if own else 2, rows, padded_width(v)), dtype=torch.float32, device=device)  # θ, ref
    kl = torch.empty(n, dtype=torch.float32, device=device)
    dh = torch.empty_like(hidden) if want_h else None
    dw = torch.empty_like(weight) if want_w else None
    dw_acc = dw_accumulator(dw, triton.cdiv(n, rows))
    db = torch.zeros(v, dtype=torch.float32, device=device) if want_b else None
    block_rows, block, warps = kl_row_tiles(v)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        u, ur = logits[0, :r1 - r0, :v], logits[-1, :r1 - r0, :v]
        matmul(hidden[r0:r1], weight.t(), u)
        if not own:
            matmul(ref_hidden[r0:r1], ref_weight.t(), ur)
        g = logits[0].view(hidden.dtype)[:r1 - r0, :v]  # G over u's memory, row stride unchanged in bytes
        kl_rows_kernel[(triton.cdiv(r1 - r0, block_rows),)](
            u, ur, g, weight if bias is None else bias, ref_weight if ref_bias is None else ref_bias,
            coef if labels is None else labels[r0:r1], coef[r0:r1], kl[r0:r1], kl if db is None else db, r1 - r0, v,
            u.stride(0), g.stride(0), softcap or 1.0, float(beta), HAS_BIAS=bias is not None,
            HAS_REF_BIAS=ref_bias is not None, SOFTCAP=softcap is not None, TARGET=target, NEED_DB=db is not None,
            ROWS=block_rows, BLOCK=block, num_warps=warps)
        chunk_products(g, weight, hidden[r0:r1], dh[r0:r1] if want_h else None, dw_acc, r0 == 0, unscale)
    if dw_acc is not dw:
        dw.copy_(dw_acc)
    if db is not None and unscale is not None:
        db *= unscale
    return kl, [dh, dw, None if db is None else db.to(bias.dtype)]
