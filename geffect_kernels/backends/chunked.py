"""The ``torch`` backend: plain torch, chunked over tokens so that at most one chunk of logits lives.

- ``token_logprobs``: forward keeps only the LSE per token; backward recomputes each chunk's logits.
- ``weighted_loss`` (token-level objectives), ``kl_divergence`` and ``weighted_loss_from_logits``: the
  weights depend only on detached quantities, so the gradients are produced inside the forward pass
  (three matmuls per chunk, no recomputation; one pass over given logits) and the backward only scales
  them by the scalar upstream gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import out_dtype
from .autograd import (GradBuffers, fused_head_pass, grads_wanted, handed_over_grad, row_chunks, scaled_grads,
                       soft_cap_)
from .interface import Backend

def _logits(h, weight, bias, softcap):
    """Logits of a chunk in a fresh compute-dtype buffer, and dz/du of the soft-cap."""
    return soft_cap_(F.linear(h, weight, bias).to(out_dtype(h.dtype)), softcap)


def _logits_copy(logits, softcap):
    """A chunk of given logits copied to a scratch buffer (the caller's logits are never written)."""
    return soft_cap_(logits.to(out_dtype(logits.dtype), copy=True), softcap)


def _logprobs_(z, labels, valid):
    """ℓ_t of a chunk, overwriting the scratch buffer ``z`` with e = exp(z − max).

    Returns ℓ (0 where not valid), the LSE and the row sums s of e, so that softmax = e / s: the
    gradient is then formed from the same buffer without a second exp pass.
    """
    picked = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    m = z.amax(1)
    s = z.sub_(m.unsqueeze(1)).exp_().sum(1)
    lse = m + s.log()
    return torch.where(valid, picked - lse, 0), lse, s


def _grad_logits_(e, s, coef, labels, dtanh):
    """Overwrite e = s · softmax(z) with coef_t · (onehot(y_t) − softmax(z_t)) · dz/du."""
    g = e.mul_((-coef / s).unsqueeze(1))
    g.scatter_add_(1, labels.unsqueeze(1), coef.unsqueeze(1))
    return g.mul_(dtanh) if dtanh is not None else g


def _recomputed_grad_logits(z, lse, coef, labels, dtanh):
    """Backward of saved LSEs: softmax = exp(z − lse), formed in place."""
    return _grad_logits_(z.sub_(lse.unsqueeze(1)).exp_(), 1.0, coef, labels, dtanh)


class ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap):
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        out = torch.empty(labels.shape, dtype=out_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(out)
        for sl in row_chunks(hidden.shape[0], weight.shape[0]):
            z, _ = _logits(hidden[sl], weight, bias, softcap)
            out[sl], lse[sl], _ = _logprobs_(z, safe[sl], valid[sl])
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse)
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, safe, valid, lse = ctx.saved_tensors
        grads = GradBuffers(hidden, weight, bias, ctx.needs_input_grad)
        coef_all = torch.where(valid, grad_out, 0)
        for sl in row_chunks(hidden.shape[0], weight.shape[0]):
            z, dtanh = _logits(hidden[sl], weight, bias, ctx.softcap)
            grads.add(_recomputed_grad_logits(z, lse[sl], coef_all[sl], safe[sl], dtanh), sl, hidden, weight)
        return (*grads.result(weight, bias), None, None, None)


class FusedWeightedLoss(torch.autograd.Function):
    """scale · Σ_t w_t ℓ_t, gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref, ignore_index, softcap, weighting, scale, wanted):
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)

        def chunk_loss(sl, want_grad):
            z, dtanh = _logits(hidden[sl], weight, bias, softcap)
            logprobs, _, row_sums = _logprobs_(z, safe[sl], valid[sl])
            w = weighting.weights(logprobs, None if ref is None else ref[sl])
            coef = torch.where(valid[sl], w * scale, 0)
            return (coef * logprobs).sum(), _grad_logits_(z, row_sums, coef, safe[sl], dtanh) if want_grad else None

        loss, ctx.grads = fused_head_pass(hidden, weight, bias, wanted, chunk_loss, out_dtype(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (*scaled_grads(ctx.grads, grad_out), *([None] * 7))


class FusedKL(torch.autograd.Function):
    """scale · Σ_valid KL(p_ref,t ‖ p_θ,t), gradients (θ side only) computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index,
                softcap, scale, wanted):
        valid = labels != ignore_index

        def chunk_loss(sl, want_grad):
            z, dtanh = _logits(hidden[sl], weight, bias, softcap)
            log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
            zr, _ = _logits(ref_hidden[sl], ref_weight, ref_bias, softcap)
            log_q = zr.sub_(torch.logsumexp(zr, dim=-1, keepdim=True))
            q = log_q.exp()
            coef = (valid[sl].to(z.dtype) * scale).unsqueeze(1)
            part = (coef * q * (log_q - log_p)).sum()
            if not want_grad:
                return part, None
            g = log_p.exp_().sub_(q).mul_(coef)  # ∂KL/∂z = p − q
            return part, g.mul_(dtanh) if dtanh is not None else g

        loss, ctx.grads = fused_head_pass(hidden, weight, bias, wanted, chunk_loss, out_dtype(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (*scaled_grads(ctx.grads, grad_out), *([None] * 8))


class ChunkedLogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap):
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        out = torch.empty(labels.shape, dtype=out_dtype(logits.dtype), device=logits.device)
        lse = torch.empty_like(out)
        for sl in row_chunks(logits.shape[0], logits.shape[1]):
            z, _ = _logits_copy(logits[sl], softcap)
            out[sl], lse[sl], _ = _logprobs_(z, safe[sl], valid[sl])
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        coef_all = torch.where(valid, grad_out, 0)
        for sl in row_chunks(logits.shape[0], logits.shape[1]):
            z, dtanh = _logits_copy(logits[sl], ctx.softcap)
            grad[sl] = _recomputed_grad_logits(z, lse[sl], coef_all[sl], safe[sl], dtanh)
        return grad, None, None, None


class FusedLogitsWeightedLoss(torch.autograd.Function):
    """scale · Σ_t w_t ℓ_t from given logits in one pass: the gradient is formed in the forward, into a
    new buffer or, with ``inplace``, into the caller's logits (each chunk is copied before it is overwritten)."""

    @staticmethod
    def forward(ctx, logits, labels, ref, ignore_index, softcap, weighting, scale, wanted, inplace):
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        grad = None
        if wanted:  # detach(): the same storage under a new tensor object, which autograd takes without a copy
            grad = logits.detach() if inplace and logits.is_contiguous() else torch.empty_like(logits)
        loss = torch.zeros((), dtype=out_dtype(logits.dtype), device=logits.device)
        for sl in row_chunks(logits.shape[0], logits.shape[1]):
            z, dtanh = _logits_copy(logits[sl], softcap)
            logprobs, _, row_sums = _logprobs_(z, safe[sl], valid[sl])
            coef = torch.where(valid[sl], weighting.weights(logprobs, None if ref is None else ref[sl]) * scale, 0)
            loss += (coef * logprobs).sum()
            if grad is not None:
                grad[sl] = _grad_logits_(z, row_sums, coef, safe[sl], dtanh)
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return handed_over_grad(ctx, grad_out), *([None] * 8)


class ChunkedBackend(Backend):
    name = "torch"

    def is_available(self, device):
        return True

    def token_logprobs(self, hidden, weight, bias, labels, *, ignore_index, softcap):
        return ChunkedLogprobs.apply(hidden, weight, bias, labels, ignore_index, softcap)

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, *, ignore_index, softcap,
                      weighting, scale):
        return FusedWeightedLoss.apply(hidden, weight, bias, labels, ref_logprobs, ignore_index, softcap,
                                       weighting, scale, grads_wanted(hidden, weight, bias))

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *,
                      ignore_index, softcap, scale):
        return FusedKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                             None if ref_bias is None else ref_bias.detach(), labels, ignore_index,
                             softcap, scale, grads_wanted(hidden, weight, bias))

    def token_logprobs_from_logits(self, logits, labels, *, ignore_index, softcap):
        return ChunkedLogitsLogprobs.apply(logits, labels, ignore_index, softcap)

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale,
                                  inplace=False):
        return FusedLogitsWeightedLoss.apply(logits, labels, ref_logprobs, ignore_index, softcap, weighting, scale,
                                             grads_wanted(logits)[0], inplace)


BACKENDS = {"torch": ChunkedBackend()}
