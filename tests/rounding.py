"""Tolerances for low-precision inputs from each dtype's error analysis, tight enough that a wrong algorithm fails:
tests/test_logprobs.py shows a log-sum-exp rounded to bfloat16 breaking the log-prob bound below."""
import torch

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _logits_and_error(hidden, weight, dtype, bias=None, softcap=None):
    """Exact float64 logits [N, V] of the rounded inputs and the bound on each logit's error (see `logprob_bound`);
    a bias adds its float32 rounding, and the soft-cap z = s·tanh(u/s) shrinks the error by dz/du and adds tanh's
    float32 rounding, ≤ 4·2⁻²⁴ s."""
    u32 = UNIT_ROUNDOFF[torch.float32]
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    z = h @ w.T
    dz = UNIT_ROUNDOFF[dtype] * z.abs() + h.shape[1] * u32 * (h.abs() @ w.abs().T)
    if bias is not None:
        z = z + bias.double()
        dz = dz + UNIT_ROUNDOFF[dtype] * z.abs()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z, dz = softcap * t, (1 - t * t) * dz + 4 * u32 * softcap
    return z, dz


def stats_bounds(hidden, weight, labels, dtype, bias=None, softcap=None):
    """Per-token bounds on the errors of the entropy H and of Var_p[log p] computed in float32 from logits with the
    errors of `logprob_bound`. First order in δz: ∂H/∂z_k = −p_k d_k and ∂Var/∂z_k = p_k (d_k² − Var + 2 d_k), with
    d = log p + H = z − E_p[z]; plus float32's rounding of the sums over V and of each d_k
    (≤ 2⁻²⁴ (|z_k| + |E_p z|))."""
    z, dz = _logits_and_error(hidden, weight, dtype, bias, softcap)
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1, keepdim=True)
    d = log_p + entropy
    var = (p * d * d).sum(-1, keepdim=True)
    u, v = UNIT_ROUNDOFF[torch.float32], z.shape[1]
    d_rounding = u * (z.abs() + (p * z).sum(-1, keepdim=True).abs())
    lse = torch.logsumexp(z, -1, keepdim=True)
    b_entropy = (p * d.abs() * dz).sum(-1) + u * (v + 2 * lse.abs() + (p * z.abs()).sum(-1, keepdim=True)).squeeze(-1)
    b_var = (p * (d * d - var + 2 * d).abs() * dz).sum(-1) + (u * v * var + 4 * (p * d.abs() * d_rounding)
                                                              .sum(-1, keepdim=True) + u * v).squeeze(-1)
    return b_entropy.reshape(labels.shape), b_var.reshape(labels.shape)


def logprob_bound(hidden, weight, labels, dtype, bias=None, softcap=None):
    """Per-token bound on |ℓ − ℓ_exact|, ℓ_exact in float64 on the same (rounded) inputs, for what the backends
    compute: the logits z = h Wᵀ accumulated in float32 and stored in ``dtype``, so
    |δz_j| ≤ u |z_j| + H·2⁻²⁴ Σ_k |h_k W_jk|, then ℓ = z_y − logsumexp(z) in float32. Since ∂ℓ/∂z = onehot(y) − p,
    |δℓ| ≤ |δz_y| + Σ_j p_j |δz_j|, plus float32's own rounding in the log-sum-exp, ≤ 2⁻²⁴ (V + 2 |lse|)."""
    z, dz = _logits_and_error(hidden, weight, dtype, bias, softcap)
    target = labels.reshape(-1).clamp_min(0).unsqueeze(1)
    lse_rounding = UNIT_ROUNDOFF[torch.float32] * (z.shape[1] + 2 * torch.logsumexp(z, -1).abs())
    bound = dz.gather(1, target).squeeze(1) + (torch.softmax(z, -1) * dz).sum(-1) + lse_rounding
    return bound.reshape(labels.shape)
