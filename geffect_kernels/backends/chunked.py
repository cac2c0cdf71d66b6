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

from .autograd import (UPCAST_ROWS, GradBuffers, compute_dtype, fused_head_pass, fused_logits_loss, fused_loss,
                       logits_grad_, own_storage, row_chunks, soft_cap_, token_logprobs)
from .interface import Backend
from .target_rows import target_cross_entropy_rows


# torch ≥ 2.8 multiplies 16-bit CUDA matrices straight into a float32 result (cuBLAS, `out_dtype`)
_MM_TO_FLOAT32 = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def _linear(h, weight, bias):
    """h Wᵀ + b in the compute dtype. 16-bit inputs are multiplied into float32 logits: rounded to 16 bits (8
    significant bits for bfloat16) before the softmax, the logits lose up to 2⁻⁸|z|, and a KL gradient p_θ − p_ref, a
    difference of nearly equal numbers, loses most of its digits (docs/backends.md; tests/test_half_precision.py
    bounds the errors). On CUDA the product stays on bf16/fp16 tensor cores; on a CPU with bf16 dot products
    (AVX512-BF16) the float32 GEMM trades their speed for that precision
    (benchmarks/results/cpu_token_loss_bf16.csv)."""
    dtype = compute_dtype(h.dtype)
    if h.dtype == dtype:
        return F.linear(h, weight, bias)
    if h.is_cuda and _MM_TO_FLOAT32:
        z = torch.mm(h, weight.t(), out_dtype=dtype)
    else:  # no mixed-dtype product here: float32 products over UPCAST_ROWS rows of the head at a time
        z = torch.empty((h.shape[0], weight.shape[0]), dtype=dtype, device=h.device)
        h_up = h.to(dtype)
        for v0 in range(0, weight.shape[0], UPCAST_ROWS):
            torch.mm(h_up, weight[v0:v0 + UPCAST_ROWS].to(dtype).t(), out=z[:, v0:v0 + UPCAST_ROWS])
    return z if bias is None else z.add_(bias)


def _logits(h, weight, bias, softcap):
    """Logits of a chunk in a fresh compute-dtype buffer, and dz/du of the soft-cap."""
    return soft_cap_(_linear(h, weight, bias), softcap)


def _logits_copy(logits, softcap):
    """A chunk of given logits copied to a scratch buffer (the caller's logits are never written)."""
    return soft_cap_(logits.to(compute_dtype(logits.dtype), copy=True), softcap)


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


def _targets(labels, opts):
    valid = labels != opts.ignore_index
    return torch.where(valid, labels, 0), valid


def _coefficients(logprobs, ref, valid, opts):
    """c_t = scale · w_t (0 where not valid) from the chunk's detached ℓ_t."""
    return torch.where(valid, opts.weighting.weights(logprobs, ref) * opts.scale, 0)


class _Logprobs:
    """ℓ_t over rows of hidden states (with the head ``weight, bias``) or of given logits, a chunk of rows at a
    time; the forward keeps the LSE, the backward recomputes each chunk's logits from it."""

    def __init__(self, opts):
        self.opts = opts

    def _chunks(self, rows, head):
        vocab = head[0].shape[0] if head else rows.shape[1]
        for sl in row_chunks(rows.shape[0], vocab):
            chunk = rows[sl]
            yield sl, _logits(chunk, *head, self.opts.softcap) if head else _logits_copy(chunk, self.opts.softcap)

    def forward(self, rows, *rest):  # (hidden, weight, bias, labels) or (logits, labels)
        *head, labels = rest
        safe, valid = _targets(labels, self.opts)
        out = torch.empty(labels.shape, dtype=compute_dtype(rows.dtype), device=rows.device)
        lse = torch.empty_like(out)
        for sl, (z, _) in self._chunks(rows, head):
            out[sl], lse[sl], _ = _logprobs_(z, safe[sl], valid[sl])
        return out, (rows, *head, labels, lse)

    def backward(self, saved, grad_out, wanted):
        rows, *head, labels, lse = saved
        safe, valid = _targets(labels, self.opts)
        coef = torch.where(valid, grad_out, 0)
        grads = GradBuffers(rows, *head, wanted) if head else None
        grad = None if head else torch.empty_like(rows)
        for sl, (z, slope) in self._chunks(rows, head):
            g = logits_grad_(z.sub_(lse[sl].unsqueeze(1)).exp_(), safe[sl], coef[sl].to(z.dtype), slope)
            if head:
                grads.add(g, sl, rows, head[0])
            else:
                grad[sl] = g
        return (*grads.result(*head), None) if head else (grad, None)


def _stats_(z, labels, valid):
    """(ℓ_t, entropy, Var_p[log p]) of a chunk, overwriting the scratch buffer ``z``.

    With x = z − max and e = exp(x), s = Σe: entropy = log s − E_p[x] and Var_p[log p] = Var_p[x], the variance
    taken about the mean (two passes over the chunk held in memory), so nothing cancels for peaky rows.
    """
    x = z.sub_(z.amax(1, keepdim=True))
    picked = x.gather(1, labels.unsqueeze(1)).squeeze(1)
    e = torch.exp(x)
    s = e.sum(1)
    log_s = s.log()
    mean = torch.linalg.vecdot(e, x) / s
    var = torch.linalg.vecdot(e, x.sub_(mean.unsqueeze(1)).square_()) / s
    return tuple(torch.where(valid, t, 0) for t in (picked - log_s, log_s - mean, var))


def token_stats(hidden, weight, bias, labels, opts):
    """(ℓ_t, entropy, Var_p[log p]) per row, a chunk of rows' logits at a time; forward only."""
    safe, valid = _targets(labels, opts)
    dtype = compute_dtype(hidden.dtype)
    out = [torch.empty(labels.shape, dtype=dtype, device=hidden.device) for _ in range(3)]
    for sl in row_chunks(hidden.shape[0], weight.shape[0]):
        z, _ = _logits(hidden[sl], weight, bias, opts.softcap)
        for buffer, chunk in zip(out, _stats_(z, safe[sl], valid[sl])):
            buffer[sl] = chunk
    return tuple(out)


class ChunkedBackend(Backend):
    name = "torch"

    def is_available(self, device):
        return True

    def logprobs_kernels(self, opts):
        return _Logprobs(opts)

    def token_logprobs(self, hidden, weight, bias, labels, opts):
        return token_logprobs(_Logprobs(opts), hidden, weight, bias, labels)

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, opts):
        safe, valid = _targets(labels, opts)

        def chunk_loss(sl, want_grad):
            z, slope = _logits(hidden[sl], weight, bias, opts.softcap)
            logprobs, _, row_sums = _logprobs_(z, safe[sl], valid[sl])
            coef = _coefficients(logprobs, None if ref_logprobs is None else ref_logprobs[sl], valid[sl], opts)
            grad = logits_grad_(z, safe[sl], coef, slope, row_sums) if want_grad else None
            return (coef * logprobs).sum(), grad

        return fused_loss(lambda wanted, *head: fused_head_pass(*head, wanted, chunk_loss, compute_dtype(hidden.dtype)),
                          hidden, weight, bias)

    def token_stats(self, hidden, weight, bias, labels, opts):
        return token_stats(hidden, weight, bias, labels, opts)

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts):
        valid = labels != opts.ignore_index
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()

        def chunk_loss(sl, want_grad):
            z, slope = _logits(hidden[sl], weight, bias, opts.softcap)
            log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
            zr, _ = _logits(ref_hidden[sl], ref_weight, ref_bias, opts.softcap)
            log_q = zr.sub_(torch.logsumexp(zr, dim=-1, keepdim=True))
            q = log_q.exp()
            coef = (valid[sl].to(z.dtype) * opts.scale).unsqueeze(1)
            part = (coef * q * (log_q - log_p)).sum()
            if not want_grad:
                return part, None
            g = log_p.exp_().sub_(q).mul_(coef)  # ∂KL/∂z = p − q
            return part, g.mul_(slope) if slope is not None else g

        return fused_loss(lambda wanted, *head: fused_head_pass(*head, wanted, chunk_loss, compute_dtype(hidden.dtype)),
                          hidden, weight, bias)

    def target_cross_entropy(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, beta):
        safe, valid = _targets(labels, opts)
        own = ref_hidden is None
        if not own:
            ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
            ref_bias = None if ref_bias is None else ref_bias.detach()

        def chunk_loss(sl, want_grad):
            z, slope = _logits(hidden[sl], weight, bias, opts.softcap)
            zt = z.detach() if own else _logits(ref_hidden[sl], ref_weight, ref_bias, opts.softcap)[0]
            ce, g = target_cross_entropy_rows(z, zt, safe[sl], valid[sl], beta, own, want_grad)
            coef = valid[sl].to(z.dtype) * opts.scale
            if g is not None:
                g.mul_(coef.unsqueeze(1))
                if slope is not None:
                    g.mul_(slope)
            return (coef * ce).sum(), g

        return fused_loss(lambda wanted, *head: fused_head_pass(*head, wanted, chunk_loss, compute_dtype(hidden.dtype)),
                          hidden, weight, bias)

    def target_cross_entropy_from_logits(self, logits, labels, opts, beta):
        """`target_cross_entropy` of the model's own given logits (CE-U over logits the caller holds)."""
        safe, valid = _targets(labels, opts)

        def compute(wanted, logits):
            grad = own_storage(logits, opts.inplace) if wanted else None
            loss = torch.zeros((), dtype=compute_dtype(logits.dtype), device=logits.device)
            for sl in row_chunks(*logits.shape):
                z, slope = _logits_copy(logits[sl], opts.softcap)
                ce, g = target_cross_entropy_rows(z, z, safe[sl], valid[sl], beta, True, grad is not None)
                coef = valid[sl].to(z.dtype) * opts.scale
                loss += (coef * ce).sum()
                if grad is not None:
                    g.mul_(coef.unsqueeze(1))
                    grad[sl] = g if slope is None else g.mul_(slope)
            return loss, grad

        return fused_logits_loss(compute, logits)

    def logits_logprobs_kernels(self, opts):
        return _Logprobs(opts)

    def token_logprobs_from_logits(self, logits, labels, opts):
        return token_logprobs(_Logprobs(opts), logits, labels)

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, opts):
        safe, valid = _targets(labels, opts)

        def compute(wanted, logits):
            # with opts.inplace the gradient goes into the caller's logits (each chunk is copied before)
            grad = own_storage(logits, opts.inplace) if wanted else None
            loss = torch.zeros((), dtype=compute_dtype(logits.dtype), device=logits.device)
            for sl in row_chunks(*logits.shape):
                z, slope = _logits_copy(logits[sl], opts.softcap)
                logprobs, _, row_sums = _logprobs_(z, safe[sl], valid[sl])
                coef = _coefficients(logprobs, None if ref_logprobs is None else ref_logprobs[sl], valid[sl], opts)
                loss += (coef * logprobs).sum()
                if grad is not None:
                    grad[sl] = logits_grad_(z, safe[sl], coef, slope, row_sums)
            return loss, grad

        return fused_logits_loss(compute, logits)


BACKENDS = {"torch": ChunkedBackend()}
