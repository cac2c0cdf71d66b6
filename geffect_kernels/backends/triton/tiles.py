"""Building blocks shared by the kernels: program ordering, the product (logit, Gram) tile, the soft-cap.

Index arithmetic that can reach N·V or V·H is done in int64 (row index cast before the stride
multiply), so tensors past 2^31 elements are addressed correctly.
"""
import triton
import triton.language as tl


@triton.jit
def grouped_pid(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (m, n) tile coordinates, GROUP_M row blocks at a time.

    Programs that run together then share a few row blocks and a few column blocks, so both operands
    of the running tiles stay in L2 instead of being streamed from HBM once per tile.
    """
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def product_tile(a_ptr, b_ptr, rows_a, rows_b, K, stride_a, stride_b,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """A[rows_a] · B[rows_b]ᵀ over K as a float32 [BLOCK_A, BLOCK_B] tile; the rows must be in range.

    The logit tile (hidden states · head rows) and the Gram kernel's two tiles. The reduction over K runs on
    tensor cores (`tl.dot`); out-of-range rows are the caller's business (clamp them, mask the results).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + rows_b.to(tl.int64)[:, None] * stride_b + offs_k[None, :]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k[None, :] < K - k
        a = tl.load(a_ptrs, mask=k_ok, other=0.0)
        b = tl.load(b_ptrs, mask=k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def add_bias(u, b_ptr, cols, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        u += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return u


@triton.jit
def tanh(x):
    # exp-based: exact limits ±1 (exp overflows to inf → 1), no libdevice needed (runs in the interpreter)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def soft_cap(u, softcap):
    """(z, dz/du) of z = s·tanh(u/s)."""
    t = tanh(u / softcap)
    return softcap * t, 1.0 - t * t


@triton.jit
def online_lse(m, s, z):
    """Fold a [BLOCK_M, BLOCK_N] tile z (−inf where masked) into the running row max m and sum s of exp(z − m)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s


@triton.jit
def reference_fold(m_r, s_r, t_r, zr, diff):
    """Fold a reference tile zr (−inf where masked) and diff = zr − z (0 there) into the running row max m_r,
    sum s_r of exp(zr − m_r) and T = Σ exp(zr − m_r)(zr − z)."""
    m_new = tl.maximum(m_r, tl.max(zr, axis=1))
    rescale = tl.exp(m_r - m_new)
    e_r = tl.exp(zr - m_new[:, None])
    return m_new, s_r * rescale + tl.sum(e_r, axis=1), t_r * rescale + tl.sum(e_r * diff, axis=1)


@triton.jit
def target_fold(m_r, s_r, t_r, a_r, zr, diff):
    """`reference_fold` that also keeps A = Σ exp(zr − m_r)(zr − m_r) (≤ 0), so that the target's entropy is
    log s_r − A/s_r with nothing cancelling; rescaled with the running max (from m_old: A + (m_old − m_new)·s)."""
    m_new = tl.maximum(m_r, tl.max(zr, axis=1))
    rescale = tl.exp(m_r - m_new)
    e_r = tl.exp(zr - m_new[:, None])
    x = tl.where(e_r > 0, zr - m_new[:, None], 0.0)  # 0 where zr is −inf (masked, or CE-U's label)
    a_r = (a_r + (m_r - m_new) * s_r) * rescale + tl.sum(e_r * x, axis=1)
    return m_new, s_r * rescale + tl.sum(e_r, axis=1), t_r * rescale + tl.sum(e_r * diff, axis=1), a_r
