"""Tolerances for low-precision inputs from each dtype's error analysis, tight enough that a wrong algorithm fails:
tests/test_logprobs.py shows a log-sum-exp rounded to bfloat16 breaking the log-prob bound below."""
import torch

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def logprob_bound(hidden, weight, labels, dtype):
    """Per-token bound on |ℓ − ℓ_exact|, ℓ_exact in float64 on the same (rounded) inputs, for what the backends
    compute: the logits z = h Wᵀ accumulated in float32 and stored in ``dtype``, so
    |δz_j| ≤ u |z_j| + H·2⁻²⁴ Σ_k |h_k W_jk|, then ℓ = z_y − logsumexp(z) in float32. Since ∂ℓ/∂z = onehot(y) − p,
    |δℓ| ≤ |δz_y| + Σ_j p_j |δz_j|, plus float32's own rounding in the log-sum-exp, ≤ 2⁻²⁴ (V + 2 |lse|)."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    z = h @ w.T
    dz = UNIT_ROUNDOFF[dtype] * z.abs() + h.shape[1] * UNIT_ROUNDOFF[torch.float32] * (h.abs() @ w.abs().T)
    target = labels.reshape(-1).clamp_min(0).unsqueeze(1)
    lse_rounding = UNIT_ROUNDOFF[torch.float32] * (w.shape[0] + 2 * torch.logsumexp(z, -1).abs())
    bound = dz.gather(1, target).squeeze(1) + (torch.softmax(z, -1) * dz).sum(-1) + lse_rounding
    return bound.reshape(labels.shape)
