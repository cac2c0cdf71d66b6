"""Fused KL(p_ref,t ‖ p_θ,t) over two linear heads, lean mode: neither model's logits reach global memory.

Pass 1 computes both heads' logit tiles on chip and keeps, per token and vocabulary split, the running
max / sum of exp for each head and T = Σ_v exp(zr_v − max_r)(zr_v − z_v), so that
KL_t = T / Σ exp(zr − max_r) + LSE_θ − LSE_ref needs no second look at the logits. The gradient
∂KL_t/∂z_t = p_θ,t − p_ref,t (times dz/du) goes through the chunked passes of `linear_backward`,
recomputing both tiles; only the θ side gets gradients. Six matmul-sized passes (2 + 2 tiles, dW, dh), extra
memory one vocabulary chunk of G. Where the logits budget (`config.logits_budget`) holds both heads' float32
logits for a chunk of tokens, `fused_kl` takes the fast mode of `kl_fast` instead: four passes.

Both reductions of `kl_loss` arrive here the same way: "tokens" as the labels' ignored positions and scale
1/n_valid, "batchmean" as no ignored position and scale 1/N.

The same passes give the cross-entropy to a label-shifted target (``TARGET``; `fused_target_ce`): SHIFTED takes
t = softmax(z_ref − β·onehot(y)) (UNDIAL), OWN the model's own logits with the label's at −∞ (CE-U; one product
per tile instead of two). CE(t, p) = KL(t ‖ p) + H(t), H(t) = log s_r − A/s_r from a third reference accumulator
A = Σ exp(zr − m_r)(zr − m_r) (`tiles.target_fold`), each term without cancellation. Under OWN the gradient
p − q is written as p_y at the label and −q_v p_y = −exp(z_v − LSE_{v≠y} + ℓ_y) elsewhere (relative precision
as p_y → 0, finite as p_y → 1), so pass 1 also keeps the label's logit.
"""
import torch
import triton
import triton.language as tl

from ..autograd import fused_loss
from .config import dot_precision, logits_budget, matmul_tiles
from .kl_fast import fast_kl_grads, fast_kl_rows
from .linear_backward import head_grads, normalized, store_grad_tile
from .linear_forward import vocab_splits
from .tiles import add_bias, grouped_pid, product_tile, online_lse, reference_fold, soft_cap, target_fold

# what the reference side is: the reference model's distribution (KL), it with the label's logit lowered by β
# (SHIFTED: UNDIAL's target), or the model's own with the label's logit at −∞ (OWN: CE-U's)
KL = tl.constexpr(0)
SHIFTED = tl.constexpr(1)
OWN = tl.constexpr(2)
N_PARTS = 7  # per split and token: max, sum (θ); max, sum, T, A (reference); the label's logit (θ)


@triton.jit
def _both_tiles(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, H, stride_h, stride_w, stride_hr,
                stride_wr, softcap, label, beta, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                SOFTCAP: tl.constexpr, TARGET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(z, dz/du, zr): the θ and target logit tiles, soft-capped (dz/du = 1 without a cap); the target is the
    reference's (KL), shifted by −β at the label (SHIFTED), or θ's with −∞ at the label (OWN: no second product).
    ``label``: per row, −1 where ignored."""
    z = add_bias(product_tile(h_ptr, w_ptr, rows, cols, H, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K,
                            PRECISION), b_ptr, cols, HAS_BIAS)
    if TARGET != OWN:
        zr = add_bias(product_tile(hr_ptr, wr_ptr, rows, cols, H, stride_hr, stride_wr, BLOCK_M, BLOCK_N, BLOCK_K,
                                 PRECISION), br_ptr, cols, HAS_REF_BIAS)
    dz = tl.full(z.shape, 1.0, tl.float32)
    if SOFTCAP:
        z, dz = soft_cap(z, softcap)
        if TARGET != OWN:
            zr, _ = soft_cap(zr, softcap)
    at_label = cols[None, :] == label[:, None]
    if TARGET == SHIFTED:
        zr = tl.where(at_label, zr - beta, zr)
    elif TARGET == OWN:
        zr = tl.where(at_label, float("-inf"), z)
    return z, dz, zr


@triton.jit
def kl_partials_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, labels_ptr, part_ptr, N, V, H, stride_h,
                       stride_w, stride_hr, stride_wr, tiles_per_split, n_splits, softcap, beta,
                       HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                       TARGET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """part_ptr: [N_PARTS, n_splits, N] float32 = (max θ, sum θ, max ref, sum ref, T, A, z_y) per split (A and
    z_y, the label's logit where it lies in the split, 0 elsewhere: a cross-entropy TARGET; z_y only for OWN)."""
    pid_m, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), n_splits, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows % N
    label = tl.load(labels_ptr + rows_in)
    m = tl.full((BLOCK_M,), -3.0e38, tl.float32)  # finite: tiles wholly past V add exactly 0
    s = tl.zeros((BLOCK_M,), tl.float32)
    m_r = tl.full((BLOCK_M,), -3.0e38, tl.float32)
    s_r = tl.zeros((BLOCK_M,), tl.float32)
    t_r = tl.zeros((BLOCK_M,), tl.float32)
    a_r = tl.zeros((BLOCK_M,), tl.float32)
    z_y = tl.zeros((BLOCK_M,), tl.float32)
    first_col = pid_s * tiles_per_split * BLOCK_N
    for t in range(0, tiles_per_split):
        cols = first_col + t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols[None, :] < V
        z, _, zr = _both_tiles(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows_in, cols % V, H, stride_h,
                               stride_w, stride_hr, stride_wr, softcap, label, beta, HAS_BIAS, HAS_REF_BIAS, SOFTCAP,
                               TARGET, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        if TARGET == OWN:  # zr = z off the label, and exp(zr) = 0 at it: T = 0
            diff = tl.zeros(z.shape, tl.float32)
        else:
            diff = tl.where(col_ok, zr - z, 0.0)
        if TARGET == OWN:  # ℓ_y for OWN's gradient
            z_y += tl.sum(tl.where((cols[None, :] == label[:, None]) & col_ok, z, 0.0), axis=1)
        z = tl.where(col_ok, z, float("-inf"))
        zr = tl.where(col_ok, zr, float("-inf"))
        m, s = online_lse(m, s, z)
        if TARGET == KL:
            m_r, s_r, t_r = reference_fold(m_r, s_r, t_r, zr, diff)
        else:
            m_r, s_r, t_r, a_r = target_fold(m_r, s_r, t_r, a_r, zr, diff)
    out = pid_s * N + rows
    ok = rows < N
    step = n_splits * N
    tl.store(part_ptr + out, m, mask=ok)
    tl.store(part_ptr + step + out, s, mask=ok)
    tl.store(part_ptr + 2 * step + out, m_r, mask=ok)
    tl.store(part_ptr + 3 * step + out, s_r, mask=ok)
    tl.store(part_ptr + 4 * step + out, t_r, mask=ok)
    if TARGET != KL:
        tl.store(part_ptr + 5 * step + out, a_r, mask=ok)
        tl.store(part_ptr + 6 * step + out, z_y, mask=ok)


@triton.jit
def kl_combine_kernel(part_ptr, valid_ptr, kl_ptr, lse_ptr, lse_ref_ptr, lp_ptr, N, n_splits, TARGET: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Per token: KL_t (or CE_t = KL_t + H(t) for a cross-entropy TARGET), both LSEs and (TARGET) ℓ_y."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    step = n_splits * N
    m = tl.full((BLOCK,), -3.0e38, tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    m_r = tl.full((BLOCK,), -3.0e38, tl.float32)
    s_r = tl.zeros((BLOCK,), tl.float32)
    t_r = tl.zeros((BLOCK,), tl.float32)
    a_r = tl.zeros((BLOCK,), tl.float32)
    z_y = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n_splits):
        at = part_ptr + i * N + rows
        m_i = tl.load(at, mask=ok, other=0.0)
        m_new = tl.maximum(m, m_i)
        s = s * tl.exp(m - m_new) + tl.load(at + step, mask=ok, other=0.0) * tl.exp(m_i - m_new)
        m = m_new
        mr_i = tl.load(at + 2 * step, mask=ok, other=0.0)
        mr_new = tl.maximum(m_r, mr_i)
        old, new = tl.exp(m_r - mr_new), tl.exp(mr_i - mr_new)
        sr_i = tl.load(at + 3 * step, mask=ok, other=0.0)
        if TARGET != KL:  # A relative to the new max: A + (m_old − m_new)·s for each side
            a_i = tl.load(at + 5 * step, mask=ok, other=0.0)
            a_r = (a_r + (m_r - mr_new) * s_r) * old + (a_i + (mr_i - mr_new) * sr_i) * new
            z_y += tl.load(at + 6 * step, mask=ok, other=0.0)
        s_r = s_r * old + sr_i * new
        t_r = t_r * old + tl.load(at + 4 * step, mask=ok, other=0.0) * new
        m_r = mr_new
    lse = m + tl.log(s)
    lse_r = m_r + tl.log(s_r)
    value = t_r / s_r + lse - lse_r
    if TARGET != KL:
        value += tl.log(s_r) - a_r / s_r  # H(t)
        tl.store(lp_ptr + rows, z_y - lse, mask=ok)
    valid = tl.load(valid_ptr + rows, mask=ok, other=0.0)
    tl.store(kl_ptr + rows, tl.where(valid != 0, value, 0.0), mask=ok)
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(lse_ref_ptr + rows, lse_r, mask=ok)


@triton.jit
def kl_grad_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, labels_ptr, lse_ptr, lse_ref_ptr, lp_ptr, coef_ptr,
                   g_ptr, db_ptr, N, V, H, v_start, width, stride_h, stride_w, stride_hr, stride_wr, stride_g, softcap,
                   beta, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                   TARGET: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(width, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows % N
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v_start + local
    label = tl.load(labels_ptr + rows_in)
    z, dz, zr = _both_tiles(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows_in, cols % V, H, stride_h, stride_w,
                            stride_hr, stride_wr, softcap, label, beta, HAS_BIAS, HAS_REF_BIAS, SOFTCAP, TARGET,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    lse = tl.load(lse_ptr + rows_in)
    lse_r = tl.load(lse_ref_ptr + rows_in)
    coef = tl.load(coef_ptr + rows_in)
    if TARGET == OWN:
        lp = tl.load(lp_ptr + rows_in)
        g = coef[:, None] * own_target_grad(z, lse, lse_r, lp, cols, label) * dz
    else:
        g = coef[:, None] * (tl.exp(z - lse[:, None]) - tl.exp(zr - lse_r[:, None])) * dz
    store_grad_tile(g, g_ptr, db_ptr, rows, local, cols, rows < N, local < width, stride_g, NEED_DB)


@triton.jit
def own_target_grad(z, lse, lse_r, lp, cols, label):
    """p − q under OWN: p_y at the label, −q_v p_y = −exp(z_v − LSE_{v≠y} + ℓ_y) elsewhere (rows without a
    label, −1: p − p = 0)."""
    at_label = cols[None, :] == label[:, None]
    off = -tl.exp(z - lse_r[:, None] + lp[:, None])
    g = tl.where(at_label, tl.exp(z - lse[:, None]), off)
    return tl.where(label[:, None] >= 0, g, 0.0)


def lean_kl_grads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, coef, unscale, wanted, softcap, *,
                  labels=None, beta=0.0, target=0):
    """(KL_t [N] float32, 0 where ``coef`` is, [dh, dW, db]) in six matmul-sized passes; arguments as
    `kl_fast.fast_kl_grads`'s (with ``target`` a cross-entropy TARGET: CE_t, ``labels`` −1 where ignored)."""
    n, h = hidden.shape
    v = weight.shape[0]
    tiles = matmul_tiles(hidden.dtype, two_products=True)
    n_m = triton.cdiv(n, tiles.block_m)
    per, n_splits = vocab_splits(n_m, triton.cdiv(v, tiles.block_n))
    common = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, SOFTCAP=softcap is not None,
                  TARGET=target, PRECISION=dot_precision(hidden.dtype), **tiles.launch())
    heads = (hidden, weight, weight if bias is None else bias,
             ref_hidden, ref_weight, ref_weight if ref_bias is None else ref_bias)
    strides = (hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0))
    labels = coef if labels is None else labels  # KL never reads them
    part = torch.empty((N_PARTS if target else 5, n_splits, n), dtype=torch.float32, device=hidden.device)
    kl_partials_kernel[(n_m * n_splits,)](*heads, labels, part, n, v, h, *strides, per, n_splits, softcap or 1.0,
                                          float(beta), **common)
    kl, lse, lse_ref, lp = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4))
    block = 1024 if n >= 1024 else max(16, triton.next_power_of_2(n))
    kl_combine_kernel[(triton.cdiv(n, block),)](part, coef, kl, lse, lse_ref, lp, n, n_splits, TARGET=target,
                                                BLOCK=block)

    def fill(g, v_start, width, db):
        grid = (n_m * triton.cdiv(width, tiles.block_n),)
        kl_grad_kernel[grid](*heads, labels, lse, lse_ref, lp, coef, g, g if db is None else db, n, v, h, v_start,
                             width, *strides, g.stride(0), softcap or 1.0, float(beta), NEED_DB=db is not None,
                             **common)

    return kl, head_grads(hidden, weight, bias, wanted, fill, unscale)


def _fused(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, opts, **target):
    """scale · Σ_valid of KL_t or CE_t (``target``: the keywords of `lean_kl_grads`), gradients in the forward."""

    def compute(wanted, hidden, weight, bias):
        # c_t = scale where valid, else 0; scale may be a device scalar (1/n_valid): no synchronization
        coef = (valid * opts.scale).float()
        normal, unscale = normalized(coef, hidden.dtype)
        heads = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, normal, unscale, wanted, opts.softcap)
        own = target.get("target") == OWN.value
        rows = fast_kl_rows(hidden, weight, logits_budget(), own=own) if any(wanted) else 0
        kl, grads = fast_kl_grads(*heads, rows, **target) if rows else lean_kl_grads(*heads, **target)
        return (kl * coef).sum(), grads

    return fused_loss(compute, hidden, weight, bias)


def fused_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts):
    """scale · Σ_valid KL(p_ref,t ‖ p_θ,t); gradients (θ side) produced in the forward: in the fast mode
    (`kl_fast`, four passes) where the logits budget holds a chunk of both heads' float32 logits, else lean (six)."""
    return _fused(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels != opts.ignore_index, opts)


def fused_target_ce(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, beta):
    """scale · Σ_valid CE(t_t, p_θ,t), t = softmax(z_ref − β·onehot(y)) (``ref_hidden`` None: θ's own logits with
    the label's at −∞, whatever ``beta``); the KL's passes (fast or lean), the target's entropy added."""
    own = ref_hidden is None
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, -1).contiguous()
    if own:
        ref_hidden, ref_weight, ref_bias = hidden, weight, None  # not read
    return _fused(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, opts, labels=safe,
                  beta=0.0 if own else beta, target=int(OWN.value if own else SHIFTED.value))
