"""The head kernels behind the shared autograd Functions: ℓ_t with a generic backward, and the fused loss.

- `head_logprobs_op`: forward = pass 1 (ℓ_t, LSE kept); backward folds the upstream ∂L/∂ℓ_t into the
  per-token coefficients and runs the chunked gradient passes (npo, simnpo, user objectives).
- `weighted_head_loss`: scale · Σ_t w_t ℓ_t with the weights computed in-kernel from the detached ℓ_t;
  the gradients are produced inside the forward call (lean or fast mode) and the backward only scales
  them by the scalar upstream gradient.
"""
import torch

from ..autograd import fused_loss, token_logprobs
from .config import logits_budget
from .fast_path import fast_head_grads, fast_rows
from .linear_backward import head_grads, normalized, token_grad_filler
from .linear_forward import head_logprobs


class HeadLogprobs:
    def __init__(self, opts):
        self.opts = opts

    def forward(self, hidden, weight, bias, labels):
        lp, lse, _ = head_logprobs(hidden, weight, bias, labels, ignore_index=self.opts.ignore_index,
                                   softcap=self.opts.softcap)
        return lp, (hidden, weight, bias, labels, lse)

    def backward(self, saved, grad_lp, wanted):
        hidden, weight, bias, labels, lse = saved
        coef = torch.where(labels != self.opts.ignore_index, grad_lp.float(), 0.0)
        coef, unscale = normalized(coef, hidden.dtype)
        fill = token_grad_filler(hidden, weight, bias, labels, lse, coef, self.opts.softcap)
        return (*head_grads(hidden, weight, bias, wanted[:3], fill, unscale), None)


def head_logprobs_op(hidden, weight, bias, labels, opts):
    return token_logprobs(HeadLogprobs(opts), hidden, weight, bias, labels)


def weighted_head_loss(hidden, weight, bias, labels, ref, opts):
    args = dict(ignore_index=opts.ignore_index, softcap=opts.softcap, weighting=opts.weighting)

    def compute(wanted, hidden, weight, bias):
        rows = fast_rows(hidden, weight, logits_budget()) if any(wanted) else 0
        if rows:
            return fast_head_grads(hidden, weight, bias, labels, ref, wanted, rows, scale=opts.scale, **args)
        lp, lse, w = head_logprobs(hidden, weight, bias, labels, ref, **args)
        coef = w * opts.scale  # the scale may be a device scalar (1/n_valid): no synchronization
        loss = (coef * lp).sum()
        coef, unscale = normalized(coef, hidden.dtype)
        fill = token_grad_filler(hidden, weight, bias, labels, lse, coef, opts.softcap)
        return loss, head_grads(hidden, weight, bias, wanted, fill, unscale)

    return fused_loss(compute, hidden, weight, bias)
