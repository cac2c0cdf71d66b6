"""In-kernel per-token weights w_t: the formulas of `geffect_kernels.catalog`, selected by its kernel codes.

KIND is an objective's ``kernel_code`` (a compile-time constant; the constants below are `catalog.KernelWeight`'s);
NO_WEIGHTS marks a launch that only computes log-probabilities. A code without a formula here is refused: by
`weight_args` before a launch, and by `token_weight` when it compiles.
"""
import triton
import triton.language as tl

from ...catalog import KernelWeight

NO_WEIGHTS = -1
ONE = tl.constexpr(int(KernelWeight.ONE))
WGA = tl.constexpr(int(KernelWeight.WGA))
SATIMP = tl.constexpr(int(KernelWeight.SATIMP))
TNPO = tl.constexpr(int(KernelWeight.TNPO))
WTNPO = tl.constexpr(int(KernelWeight.WTNPO))
KINDS = (ONE.value, WGA.value, SATIMP.value, TNPO.value, WTNPO.value)  # every code `token_weight` has a formula for


def weight_args(weighting) -> dict:
    """Kernel arguments describing ``weighting`` (a `catalog.TokenWeighting`; None: no weights)."""
    if weighting is None:
        return {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "eps": 0.0, "KIND": NO_WEIGHTS}
    if weighting.code not in KINDS:
        raise ValueError(f"the Triton kernels have no token-weight formula for code {weighting.code} "
                         f"(objective {weighting.objective.name!r}); known: {KINDS}")
    return {"alpha": weighting.alpha, "beta": weighting.beta, "gamma": weighting.gamma, "eps": weighting.eps,
            "KIND": weighting.code}


@triton.jit
def expm1(x):
    # Taylor series where exp(x) − 1 would cancel; error < 1e-8 relative for |x| < 0.5
    small = tl.abs(x) < 0.5
    y = tl.where(small, x, 0.0)
    poly = y * (1 + y / 2 * (1 + y / 3 * (1 + y / 4 * (1 + y / 5 * (1 + y / 6 * (1 + y / 7 * (1 + y / 8)))))))
    return tl.where(small, poly, tl.exp(x) - 1.0)


@triton.jit
def token_weight(lp, ref, alpha, beta, gamma, eps, KIND: tl.constexpr):
    """w_t from the detached ℓ_t (and ℓ_ref,t); float32 in, float32 out."""
    if KIND == ONE:
        w = tl.full(lp.shape, 1.0, tl.float32)
    elif KIND == WGA:  # p^α
        w = tl.exp(alpha * lp)
    elif KIND == SATIMP:  # p^α (1 − p)^γ, with (1 − p) = −expm1(ℓ) to keep precision as p → 1
        q = tl.maximum(-expm1(lp), 0.0)
        q_pow = tl.where(q > 0, tl.exp(gamma * tl.log(tl.maximum(q, 1e-38))), tl.where(gamma == 0, 1.0, 0.0))
        w = tl.exp(alpha * lp) * q_pow
    elif KIND == TNPO:  # 2p^β / (p^β + p_ref^β + ε)
        w = tnpo_weight(lp, ref, beta, eps)
    elif KIND == WTNPO:
        w = tnpo_weight(lp, ref, beta, eps) * tl.exp(alpha * lp)
    else:
        tl.static_assert(False, "unknown token-weight code (catalog.KernelWeight)")
    return w


@triton.jit
def tnpo_weight(lp, ref, beta, eps):
    """ε = 0: the exact σ form 2σ(β(ℓ − ℓ_ref)), overflow-free (exp → inf gives 0); ε > 0 (the official
    code's 1e-5): in log space, shifted by the larger of βℓ, βℓ_ref (ε·e^{−m} → inf gives 0)."""
    x = beta * lp
    x_ref = beta * ref
    m = tl.maximum(x, x_ref)
    a = tl.exp(x - m)
    with_eps = 2.0 * a / (a + tl.exp(x_ref - m) + eps * tl.exp(-m))
    return tl.where(eps == 0.0, 2.0 / (1.0 + tl.exp(x_ref - x)), with_eps)
