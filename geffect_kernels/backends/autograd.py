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


# Vocabulary rows of the head upcast at a time for the float32 products of float16 inputs (see GradBuffers.add).
UPCAST_ROWS = 4096


class GradBuffers:
    """Gradient buffers for hidden, weight, bias (None where not wanted), filled chunk by chunk; dW and db
    accumulate in float32 (float64 for float64 inputs). Shared by the torch and csrc backends.

    A chunk's logits gradient g carries c_t = w_t / n_valid, so in float16 most of its entries (c_t · p, with
    p ~ 1/V) fall below the smallest float16 subnormal and would flush to zero: float16 inputs therefore go
    into float32 products (g stays float32; the head is upcast UPCAST_ROWS rows at a time for dh, the chunk's
    hidden states for dW). bfloat16 has float32's range and keeps the 16-bit products.
    """

    def __init__(self, hidden, weight, bias, wanted):
        acc = out_dtype(hidden.dtype)
        self.dh = torch.empty_like(hidden) if wanted[0] else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if wanted[1] else None
        self.db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and wanted[2] else None

    def add(self, g, sl, hidden, weight):
        if hidden.dtype == torch.float16:
            self._add_float32(g.float(), sl, hidden, weight)
        else:
            self._add(g.to(hidden.dtype), sl, hidden, weight)
        if self.db is not None:
            self.db += g.sum(0)

    def _add(self, g, sl, hidden, weight):
        if self.dh is not None:
            self.dh[sl] = g @ weight
        if self.dw is not None:
            if g.dtype == self.dw.dtype:
                self.dw.addmm_(g.t(), hidden[sl])  # in place: no V×H temporary per chunk
            else:
                self.dw += (g.t() @ hidden[sl]).to(self.dw.dtype)

    def _add_float32(self, g, sl, hidden, weight):
        if self.dh is not None:
            dh = torch.zeros((g.shape[0], weight.shape[1]), dtype=torch.float32, device=g.device)
            for v0 in range(0, weight.shape[0], UPCAST_ROWS):
                dh.addmm_(g[:, v0:v0 + UPCAST_ROWS], weight[v0:v0 + UPCAST_ROWS].float())
            self.dh[sl] = dh
        if self.dw is not None:
            self.dw.addmm_(g.t(), hidden[sl].float())

    def result(self, weight, bias):
        return [self.dh, None if self.dw is None else self.dw.to(weight.dtype),
                None if self.db is None else self.db.to(bias.dtype)]


def _is_one(grad_out):
    """Whether the upstream scalar is 1, asked only where the answer costs no device synchronization."""
    return grad_out.device.type == "cpu" and bool(grad_out == 1)


def scaled_grads(ctx, grad_out):
    """Backward of a loss whose forward already produced its gradients (``ctx.grads``): hand them to autograd,
    scaled in place by the upstream scalar. On the CPU a 1 (the common ``loss.backward()``) skips the pass; on
    a GPU the multiply is always done, since testing the device value would make the host wait for the whole
    forward. Handed over, they are gone from ``ctx``: a second backward raises instead of scaling them twice."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError("this loss's backward can run only once: its gradients were handed over")
    if _is_one(grad_out):
        return list(grads)
    return [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]


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
    return grad if _is_one(grad_out) else grad.mul_(grad_out.to(grad.dtype))


def grads_wanted(*tensors):
    """Which of these inputs need a gradient (decided outside the Function, where grad mode is visible)."""
    return tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors)
