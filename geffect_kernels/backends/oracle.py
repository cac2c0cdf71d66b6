"""The oracle: DESIGN §2 written as plainly as torch allows, full logits and autograd.

It materializes the N×V logits and is meant for checking the other backends (in float64), not for
speed. Every other backend is tested against this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import Backend


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # float64 stays, 16-bit types go to float32


def logits(hidden, weight, bias=None, softcap=None):
    """z = W h + b, soft-capped, upcast to the float32/float64 compute dtype."""
    z = F.linear(hidden, weight, bias).to(_compute_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def logprobs_from_logits(z, labels, ignore_index):
    valid = labels != ignore_index
    log_p = torch.log_softmax(z, dim=-1)
    picked = log_p.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0)


def stats_from_logits(z, labels, ignore_index):
    """(ℓ_t, entropy, Var_p[log p]) from the full softmax, 0 where ignored."""
    valid = labels != ignore_index
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    var = (p * (log_p + entropy.unsqueeze(-1)).square()).sum(-1)
    picked = log_p.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return tuple(torch.where(valid, t, 0) for t in (picked, entropy, var))


class OracleBackend(Backend):
    name = "oracle"
    traceable = True

    def is_available(self, device):
        return True

    def token_logprobs(self, hidden, weight, bias, labels, opts):
        return logprobs_from_logits(logits(hidden, weight, bias, opts.softcap), labels, opts.ignore_index)

    def token_stats(self, hidden, weight, bias, labels, opts):
        return stats_from_logits(logits(hidden, weight, bias, opts.softcap), labels, opts.ignore_index)

    def token_logprobs_from_logits(self, logits_, labels, opts):
        z = logits_.to(_compute_dtype(logits_.dtype))
        if opts.softcap is not None:
            z = opts.softcap * torch.tanh(z / opts.softcap)
        return logprobs_from_logits(z, labels, opts.ignore_index)

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts):
        log_p = torch.log_softmax(logits(hidden, weight, bias, opts.softcap), dim=-1)
        with torch.no_grad():
            log_q = torch.log_softmax(logits(ref_hidden, ref_weight, ref_bias, opts.softcap), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        return torch.where(labels != opts.ignore_index, kl, 0).sum() * opts.scale

    def target_cross_entropy(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, beta):
        z = logits(hidden, weight, bias, opts.softcap)
        valid = labels != opts.ignore_index
        with torch.no_grad():
            zt = z.clone() if ref_hidden is None else logits(ref_hidden, ref_weight, ref_bias, opts.softcap)
            # a mask, not the valid rows picked out: no data-dependent shape (torch.compile)
            at_label = zt.new_zeros((len(labels), 1)).masked_fill_(valid.unsqueeze(1), -beta)
            zt.scatter_add_(1, torch.where(valid, labels, 0).unsqueeze(1), at_label)
            target = torch.softmax(zt, dim=-1)
        ce = -(target * torch.log_softmax(z, dim=-1)).sum(-1)
        return torch.where(valid, ce, 0).sum() * opts.scale


BACKENDS = {"oracle": OracleBackend()}
