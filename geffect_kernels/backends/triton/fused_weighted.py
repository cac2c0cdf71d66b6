"""Autograd over the head kernels: ℓ_t with a generic backward, and the fused weighted loss.

- `HeadLogprobs`: forward = pass 1 (ℓ_t, LSE kept); backward folds the upstream ∂L/∂ℓ_t into the
  per-token coefficients and runs the chunked gradient passes (npo, simnpo, user objectives).
- `FusedWeightedLoss`: scale · Σ_t w_t ℓ_t with the weights computed in-kernel from the detached ℓ_t;
  the gradients are produced inside the forward call (lean or fast mode) and the backward only scales
  them by the scalar upstream gradient.
"""
import torch

from ..autograd import scaled_grads
from .config import logits_budget
from .fast_path import fast_head_grads, fast_rows
from .linear_backward import head_grads, token_grad_filler
from .linear_forward import head_logprobs


class HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap):
        lp, lse, _ = head_logprobs(hidden, weight, bias, labels, ignore_index=ignore_index, softcap=softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        return lp

    @staticmethod
    def backward(ctx, grad_lp):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        coef = torch.where(labels != ctx.ignore_index, grad_lp.float(), 0.0).contiguous()
        fill = token_grad_filler(hidden, weight, bias, labels, lse, coef, ctx.softcap)
        return (*head_grads(hidden, weight, bias, ctx.needs_input_grad[:3], fill), None, None, None)


class FusedWeightedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref, ignore_index, softcap, weighting, scale, wanted):
        args = dict(ignore_index=ignore_index, softcap=softcap, weighting=weighting, scale=scale)
        rows = fast_rows(hidden, weight, logits_budget()) if any(wanted) else 0
        if rows:
            loss, grads = fast_head_grads(hidden, weight, bias, labels, ref, wanted, rows, **args)
        else:
            lp, lse, coef = head_logprobs(hidden, weight, bias, labels, ref, **args)
            loss = (coef * lp).sum()
            grads = head_grads(hidden, weight, bias, wanted,
                               token_grad_filler(hidden, weight, bias, labels, lse, coef, softcap))
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (*scaled_grads(ctx.grads, grad_out), *([None] * 7))
