"""Autograd pieces shared by the backends: row chunks, the soft-cap, gradient buffers filled chunk by
chunk, and the backward of losses whose forward already produced their gradients."""
from __future__ import annotations

import torch

from ..inputs import out_dtype

# Budget for one chunk of float32 logits; temporaries in a chunk are a small multiple of it.
CHUNK_BYTES = 64 * 2**20


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


class GradBuffers:
    """Gradient buffers for hidden, weight, bias (None where not wanted), filled chunk by chunk; dW and db
    accumulate in float32 (float64 for float64 inputs). Shared by the torch and csrc backends."""

    def __init__(self, hidden, weight, bias, wanted):
        acc = out_dtype(hidden.dtype)
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


def scaled_grads(grads, grad_out):
    """Backward of a loss whose gradients the forward already produced: scale by the upstream scalar
    (the common ``loss.backward()`` passes 1: then no gradient-sized copy)."""
    if bool(grad_out == 1):
        return list(grads)
    return [None if g is None else g * grad_out.to(g.dtype) for g in grads]


def fused_head_pass(hidden, weight, bias, wanted, chunk_loss, loss_dtype):
    """Σ over row chunks of ``chunk_loss(rows, want_grad) -> (loss, gradient of the chunk's logits or None)``,
    folding each chunk's logits gradient into dh, dW, db as it goes: the forward pass of a loss whose
    gradients need no second look at the logits. Returns the loss and the gradients [dh, dW, db]."""
    grads = GradBuffers(hidden, weight, bias, wanted)
    loss = torch.zeros((), dtype=loss_dtype, device=hidden.device)
    for sl in row_chunks(hidden.shape[0], weight.shape[0]):
        part, grad_logits = chunk_loss(sl, any(wanted))
        loss += part
        if grad_logits is not None:
            grads.add(grad_logits, sl, hidden, weight)
    return loss, grads.result(weight, bias)


def handed_over_grad(ctx, grad_out):
    """Backward of a logits loss whose forward wrote the gradient into ``ctx.grad``: hand that buffer to
    autograd (no reference kept, so it is not copied), scaled in place by the upstream scalar."""
    grad, ctx.grad = ctx.grad, None
    if grad is None:
        raise RuntimeError("this loss's backward can run only once: its gradient buffer was handed over")
    return grad.mul_(grad_out.to(grad.dtype)) if bool(grad_out != 1) else grad


def grads_wanted(*tensors):
    """Which of these inputs need a gradient (decided outside the Function, where grad mode is visible)."""
    return tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors)
