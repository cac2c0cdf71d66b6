"""DESIGN §2–§3 written out independently of the package, in float64, for the tests to compare against.

Nothing here imports geffect_kernels: the log-softmax, the weights and the sequence losses are spelled
out from the formulas, so a shared bug cannot hide in both sides.
"""
import torch

IGNORE = -100


def logits(h, w, b=None, softcap=None):
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def logprobs(h, w, y, b=None, softcap=None, shift=False):
    if shift:
        h, y = h[..., :-1, :], y[..., 1:]
    z = logits(h, w, b, softcap)
    m = z.max(-1, keepdim=True).values.detach()
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))
    valid = y != IGNORE
    zy = torch.gather(z, -1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, zy - lse, torch.zeros_like(lse)), valid


def token_weight(name, lp, ref, hp):
    p = torch.exp(lp.detach())
    if name in ("ga", "nll", "po"):
        return torch.ones_like(p)
    if name == "ceu":
        return p / (1 - p)
    if name == "wga":
        return p ** hp.get("alpha", 1.0)
    if name == "satimp":
        return p ** hp.get("alpha", 5.0) * (1 - p) ** hp.get("gamma", 1.0)
    beta = hp.get("beta", 4.0)
    p_ref = torch.exp(ref.double())
    tnpo = 2 * p ** beta / (p ** beta + p_ref ** beta + hp.get("eps", 0.0))
    if name == "tnpo":
        return tnpo
    return p ** hp.get("alpha", 1.0) * tnpo  # wtnpo


def objective(name, lp, valid, ref=None, **hp):
    """The loss to minimize, from per-token log-probs ``lp`` ([B, T] for sequence objectives)."""
    if name in ("npo", "simnpo"):
        n_seq = valid.sum(-1)
        has = n_seq > 0
        seq = lp.sum(-1)
        if name == "npo":
            beta = hp.get("beta", 0.1)
            x = seq - ref.double().masked_fill(~valid, 0).sum(-1)
            per = (2 / beta) * torch.log1p(torch.exp(beta * x))  # −log σ(−βx) = log(1 + e^{βx})
        else:
            beta, delta = hp.get("beta", 2.5), hp.get("delta", 0.0)
            x = seq / n_seq.clamp_min(1)
            per = (2 / beta) * torch.log1p(torch.exp(beta * x + beta * delta))
        return (per * has).sum() / max(int(has.sum()), 1)
    n = max(int(valid.sum()), 1)
    if name == "ceu":  # from ℓ alone: −log(1 − p), whose gradient p/(1 − p) is CE-U's (its H(q) is detached)
        per = -torch.log(1 - torch.exp(torch.where(valid, lp, -1.0)))
        return torch.where(valid, per, torch.zeros_like(per)).sum() / n
    w = token_weight(name, lp, ref, hp)
    sign = -1.0 if name in ("nll", "po") else 1.0
    return sign * (w * lp * valid).sum() / n


def kl(h, w, h_ref, w_ref, y, b=None, b_ref=None, softcap=None):
    log_p = torch.log_softmax(logits(h, w, b, softcap), -1)
    log_q = torch.log_softmax(logits(h_ref, w_ref, b_ref, softcap), -1).detach()
    per = (log_q.exp() * (log_q - log_p)).sum(-1)
    valid = y != IGNORE
    return (per * valid).sum() / max(int(valid.sum()), 1)


def token_stats(h, w, y, b=None, softcap=None, shift=False):
    """(ℓ_t, entropy H_t, Var_{v~p_t}[log p_t(v)]) from the materialized softmax, 0 where ignored; and the mask."""
    if shift:
        h, y = h[..., :-1, :], y[..., 1:]
    z = logits(h, w, b, softcap)
    x = z - z.max(-1, keepdim=True).values
    log_p = x - torch.log(torch.exp(x).sum(-1, keepdim=True))
    p = torch.exp(log_p)
    entropy = -(p * log_p).sum(-1)
    var = (p * (log_p + entropy.unsqueeze(-1)) ** 2).sum(-1)
    valid = y != IGNORE
    lp = torch.gather(log_p, -1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(entropy)
    return tuple(torch.where(valid, t, zero) for t in (lp, entropy, var)), valid


def label_shifted_cross_entropy(z, z_target, y, beta):
    """Per-position −Σ_v t_v log softmax(z)_v with t = softmax(z_target − β·onehot(y)), written with a one-hot matrix
    (β = inf: the target logit at the label is −∞); 0 where y is ignored."""
    valid = y != IGNORE
    onehot = torch.nn.functional.one_hot(torch.where(valid, y, 0), z.shape[-1]).double() * valid.unsqueeze(-1)
    if beta == float("inf"):
        shifted = z_target.double().masked_fill(onehot.bool(), float("-inf"))
    else:
        shifted = z_target.double() - beta * onehot
    t = torch.softmax(shifted, -1).detach()
    per = -(t * torch.log_softmax(z.double(), -1)).sum(-1)
    return torch.where(valid, per, torch.zeros_like(per))


def undial(h, w, h_ref, w_ref, y, beta, b=None, b_ref=None, softcap=None, shift=False):
    """UNDIAL: mean over valid positions of the cross-entropy to softmax(z_ref − β·onehot(y)), reference detached."""
    if shift:
        h, h_ref, y = h[..., :-1, :], h_ref[..., :-1, :], y[..., 1:]
    z_ref = logits(h_ref, w_ref, b_ref, softcap).detach()
    per = label_shifted_cross_entropy(logits(h, w, b, softcap), z_ref, y, beta)
    return per.sum() / max(int((y != IGNORE).sum()), 1)


def ceu(h, w, y, ignore_first=1, b=None, softcap=None, shift=False):
    """CE-U: each row's first ``ignore_first`` valid labels dropped (before the shift), then the mean over valid
    positions of −Σ_{v≠y} q_v log p_v, q = sg softmax over v ≠ y."""
    y = y.clone()
    rows = y.reshape(-1, y.shape[-1])
    for row in rows:
        seen = 0
        for i in range(row.shape[0]):
            if row[i] != IGNORE and seen < ignore_first:
                row[i] = IGNORE
                seen += 1
    y = rows.reshape(y.shape)
    if shift:
        h, y = h[..., :-1, :], y[..., 1:]
    z = logits(h, w, b, softcap)
    per = label_shifted_cross_entropy(z, z.detach(), y, float("inf"))
    return per.sum() / max(int((y != IGNORE).sum()), 1)


def dpo(win_lp, win_valid, win_ref, lose_lp, lose_valid, lose_ref, beta):
    """DPO on summed log-likelihoods, one pair per row: −(2/β) mean_b log σ(β(Δ_win,b − Δ_lose,b)), Δ = Σ(ℓ − ℓ_ref)
    over the row's valid positions, log σ(x) written as −log(1 + e^{−x})."""
    rows = []
    for b in range(win_lp.shape[0]):
        d_win = sum(float(win_lp[b, t].detach() - win_ref[b, t])
                    for t in range(win_lp.shape[1]) if win_valid[b, t])
        d_lose = sum(float(lose_lp[b, t].detach() - lose_ref[b, t])
                     for t in range(lose_lp.shape[1]) if lose_valid[b, t])
        rows.append(torch.log1p(torch.exp(torch.tensor(-beta * (d_win - d_lose), dtype=torch.float64))))
    return (2 / beta) * torch.stack(rows).mean()


def mse_to(h, target, valid):
    """Σ over valid positions of ‖h_t − target_t‖² / (number of valid positions × H): the token-mean squared error of
    RMU (target c·u) and RR (target the reference's activations)."""
    diff = (h - target.expand_as(h))[valid]
    return (diff * diff).sum() / (max(int(valid.sum()), 1) * h.shape[-1])
