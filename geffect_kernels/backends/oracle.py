"""The oracle: DESIGN §2 written as plainly as torch allows, full logits and autograd.

It materializes the N×V logits and is meant for checking the other backends (in float64), not for
speed. Every other backend is tested against this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import out_dtype
from .interface import Backend


def logits(hidden, weight, bias=None, softcap=None):
    """z = W h + b, soft-capped, upcast to the float32/float64 compute dtype."""
    z = F.linear(hidden, weight, bias).to(out_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def logprobs_from_logits(z, labels, ignore_index):
    valid = labels != ignore_index
    log_p = torch.log_softmax(z, dim=-1)
    picked = log_p.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0)


class OracleBackend(Backend):
    name = "oracle"

    def is_available(self, device):
        return True

    def token_logprobs(self, hidden, weight, bias, labels, *, ignore_index, softcap):
        return logprobs_from_logits(logits(hidden, weight, bias, softcap), labels, ignore_index)

    def token_logprobs_from_logits(self, logits_, labels, *, ignore_index, softcap):
        z = logits_.to(out_dtype(logits_.dtype))
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return logprobs_from_logits(z, labels, ignore_index)

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *,
                      ignore_index, softcap, scale):
        log_p = torch.log_softmax(logits(hidden, weight, bias, softcap), dim=-1)
        with torch.no_grad():
            log_q = torch.log_softmax(logits(ref_hidden, ref_weight, ref_bias, softcap), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        return torch.where(labels != ignore_index, kl, 0).sum() * scale


BACKENDS = {"oracle": OracleBackend()}
