"""Cross-entropy to a label-shifted target, a chunk of rows at a time in torch: UNDIAL's and CE-U's head loss.

The target of row t is softmax(z_ref,t − β·onehot(y_t)), detached: UNDIAL (Dong et al., NAACL 2025) takes z_ref from
the reference model; CE-U takes the model's own logits with β = inf (the label's logit set to −∞). Per row,

    CE_t = −Σ_v t_v log p_v = Σ_v t_v (LSE(z) − z_v)        ∂CE_t/∂z = p − t

a sum of non-negative terms (nothing cancels). Under CE-U the target is q = p restricted to v ≠ y and renormalized,
so p_v − q_v = −q_v p_y for v ≠ y: the gradient is written in that form, every entry with its relative precision
(p_v − q_v would cancel as p_y → 0), and it stays finite as p_y → 1.
"""
from __future__ import annotations

import torch


def shifted_target_logits(zt, labels, valid, beta):
    """z_ref − β·onehot(y) at the valid rows (a new tensor; β = inf gives −inf at the label)."""
    at_label = zt.gather(1, labels.unsqueeze(1))
    shifted = torch.where(valid.unsqueeze(1), at_label - beta, at_label)
    return zt.scatter(1, labels.unsqueeze(1), shifted)


def target_cross_entropy_rows(z, zt, labels, valid, beta, own, want_grad):
    """(CE_t per row, ∂CE_t/∂z or None) for a chunk of logits ``z`` (already soft-capped) and target logits ``zt``
    (``own``: the model's own, β = inf). ``labels`` are safe indices (0 where not ``valid``)."""
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    zs = shifted_target_logits(zt, labels, valid, beta)
    log_t = zs - torch.logsumexp(zs, dim=1, keepdim=True)
    t = log_t.exp()
    ce = (t * log_p).sum(1).neg_()
    if not want_grad:
        return ce, None
    if own:  # p_v − q_v = −q_v p_y off the label, p_y at it (rows not valid: p − p = 0 below, coef 0 anyway)
        lp_y = log_p.gather(1, labels.unsqueeze(1))
        grad = (log_t + lp_y).exp_().neg_()
        grad.scatter_(1, labels.unsqueeze(1), lp_y.exp())
        return ce, torch.where(valid.unsqueeze(1), grad, log_p.exp() - t)
    return ce, log_p.exp_().sub_(t)
