"""Autograd shared by every backend: three Functions, one per kind of operation, and the pieces they use.

- `token_logprobs`: ℓ_t with a backward that takes any per-token upstream gradient; the backend supplies
  the forward (keeping what its backward needs, e.g. the LSE) and the backward.
- `fused_loss`: a loss over hidden states and a head whose weights depend only on detached quantities, so
  its forward also produces dh, dW, db; the backward scales them by the upstream scalar.
- `fused_logits_loss`: the same over given logits; the forward writes the logits' gradient into a buffer
  (the caller's logits themselves when allowed), which the backward hands to autograd without a copy.
"""
from __future__ import annotations

import torch

# Budget for one chunk of float32 logits; temporaries in a chunk are a small multiple of it.
CHUNK_BYTES = 64 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax, losses and accumulators run in float64 for float64 inputs, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(n_rows: int, vocab: int):
    """Slices of rows whose float32 logits fit in CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def soft_cap_(z, softcap):
    """z ← s·tanh(z/s) in place on a fresh float buffer; returns it and dz/du (None without a cap)."""
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    dz_du = 1 - t * t
    return t.mul_(softcap), dz_du


def logits_grad_(e, labels, coef, slope=None, row_sums=None):
    """Overwrite ``e`` with ∂(Σ_t c_t ℓ_t)/∂u = c_t (onehot(y_t) − softmax(z_t)) ⊙ dz/du, u the logits before
    the soft-cap. ``e`` holds softmax(z), or with ``row_sums`` s the unnormalized exp(z − max) = s·softmax(z)."""
    scale = -coef if row_sums is None else -coef / row_sums
    g = e.mul_(scale.unsqueeze(1))
    g.scatter_add_(1, labels.unsqueeze(1), coef.unsqueeze(1).to(g.dtype))
    return g.mul_(slope) if slope is not None else g


class GradBuffers:
    """Gradient buffers for hidden, weight, bias (None where not wanted), filled chunk by chunk from the
    chunk's logits gradient; dW and db accumulate in float32 (float64 for float64 inputs)."""

    def __init__(self, hidden, weight, bias, wanted):
        acc = compute_dtype(hidden.dtype)
        self.dh = torch.empty_like(hidden) if wanted[0] else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if wanted[1] else None
        self.db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and wanted[2] else None

    def add(self, g, sl, hidden, weight):
        g_in = g.to(hidden.dtype)
        if self.dh is not None:
            self.dh[sl] = g_in @ weight
        if self.dw is not None:
            if g_in.dtype == self.dw.dtype:
                self.dw.addmm_(g_in.t(), hidden[sl])  # in place: no V×H temporary per chunk
            else:
                self.dw += (g_in.t() @ hidden[sl]).to(self.dw.dtype)
        if self.db is not None:
            self.db += g.sum(0)

    def result(self, weight, bias):
        return [self.dh, None if self.dw is None else self.dw.to(weight.dtype),
                None if self.db is None else self.db.to(bias.dtype)]


def fused_head_pass(hidden, weight, bias, wanted, chunk_loss, loss_dtype):
    """Σ over row chunks of ``chunk_loss(rows, want_grad) -> (loss, gradient of the chunk's logits or None)``,
    folding each chunk's logits gradient into dh, dW, db as it goes: the forward of a `fused_loss` whose
    gradients need no second look at the logits. Returns the loss and the gradients [dh, dW, db]."""
    grads = GradBuffers(hidden, weight, bias, wanted)
    loss = torch.zeros((), dtype=loss_dtype, device=hidden.device)
    for sl in row_chunks(hidden.shape[0], weight.shape[0]):
        part, grad_logits = chunk_loss(sl, any(wanted))
        loss += part
        if grad_logits is not None:
            grads.add(grad_logits, sl, hidden, weight)
    return loss, grads.result(weight, bias)


def grads_wanted(*tensors):
    """Which of these inputs need a gradient (decided outside the Function, where grad mode is visible)."""
    return tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, *inputs):
        logprobs, saved = kernels.forward(*inputs)
        ctx.kernels = kernels
        ctx.save_for_backward(*saved)
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        return None, *ctx.kernels.backward(ctx.saved_tensors, grad_logprobs, ctx.needs_input_grad[1:])


def token_logprobs(kernels, *inputs):
    """ℓ_t from ``kernels.forward(*inputs) -> (ℓ, tensors to save)``; the backward is
    ``kernels.backward(saved, ∂L/∂ℓ, which inputs want a gradient) -> one gradient (or None) per input``."""
    return _TokenLogprobs.apply(kernels, *inputs)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute, wanted, *inputs):
        loss, ctx.grads = compute(wanted, *inputs)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # the common loss.backward() passes 1: then no gradient-sized copy
        grads = ctx.grads if bool(grad_out == 1) else [None if g is None else g * grad_out.to(g.dtype)
                                                       for g in ctx.grads]
        return None, None, *grads


def fused_loss(compute, *inputs):
    """A scalar loss from ``compute(wanted, *inputs) -> (loss, [one gradient or None per input])``, the
    gradients produced in the forward (``wanted[i]``: whether input i needs one)."""
    return _FusedLoss.apply(compute, grads_wanted(*inputs), *inputs)


class _FusedLogitsLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute, wanted, logits):
        loss, ctx.grad = compute(wanted, logits)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # hand the buffer over (no reference kept, so autograd takes it without a copy), scaled in place
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("this loss's backward can run only once: its gradient buffer was handed over")
        return None, None, grad.mul_(grad_out.to(grad.dtype)) if bool(grad_out != 1) else grad


def fused_logits_loss(compute, logits):
    """A scalar loss from ``compute(wanted, logits) -> (loss, gradient buffer or None)``, the gradient formed
    in the forward; with ``inplace`` a backend may make ``logits.detach()`` (same storage) that buffer."""
    return _FusedLogitsLoss.apply(compute, grads_wanted(logits)[0], logits)


def own_storage(logits, inplace):
    """The buffer a logits loss writes its gradient into: the caller's storage under a new tensor object
    (autograd takes that without a copy, the input object itself it would copy) when ``inplace`` allows
    it, else a fresh row-major one."""
    if inplace and logits.is_contiguous():
        return logits.detach()
    return torch.empty_like(logits, memory_format=torch.contiguous_format)
