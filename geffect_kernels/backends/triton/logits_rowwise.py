"""Kernels for callers that already hold the logits [N, V]: memory-bound, one program per row.

A row is read once for the running max / sum of exp and the target logit (ℓ_t, LSE, and for the fused
objectives the weight w_t and c_t = scale · w_t), and, where a gradient is wanted, read a second time to
write c_t (onehot − softmax) dz/du — into a fresh buffer, or over the logits themselves when the caller
allows it (no second N×V buffer).
"""
import torch
import triton
import triton.language as tl

from ..autograd import fused_logits_loss, own_storage, token_logprobs
from .config import row_block
from .tiles import soft_cap
from .weights import token_weight, weight_args


@triton.jit
def _row_lse(x_row, label, V, softcap, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """(LSE, target logit) of one row, reading it in BLOCK-wide pieces."""
    m = -3.0e38
    s = 0.0
    target = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V
        z = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            z, _ = soft_cap(z, softcap)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        target += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
    return m + tl.log(s), target


@triton.jit
def _row_grad(x_row, g_row, label, lse, coef, V, softcap, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """g = c (onehot − softmax(z)) dz/du over one row; ``g_row`` may be ``x_row`` (each piece is read first)."""
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V
        z = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            z, dz = soft_cap(z, softcap)
        g = coef * (tl.where(cols == label, 1.0, 0.0) - tl.exp(z - lse))
        if SOFTCAP:
            g = g * dz
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def logits_rows_kernel(x_ptr, labels_ptr, ref_ptr, lp_ptr, lse_ptr, coef_ptr, grad_ptr, V, stride_x, stride_g,
                       ignore_index, softcap, scale_ptr, alpha, beta, gamma, eps, KIND: tl.constexpr,
                       HAS_REF: tl.constexpr,
                       SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse, target = _row_lse(x_row, label, V, softcap, SOFTCAP, BLOCK)
    lp = tl.where(valid, target - lse, 0.0)
    tl.store(lp_ptr + row, lp)
    tl.store(lse_ptr + row, lse)
    if KIND >= 0:
        ref = tl.load(ref_ptr + row).to(tl.float32) if HAS_REF else lp
        coef = tl.where(valid, token_weight(lp, ref, alpha, beta, gamma, eps, KIND) * tl.load(scale_ptr), 0.0)
        tl.store(coef_ptr + row, coef)
        if WRITE_GRAD:
            _row_grad(x_row, grad_ptr + row.to(tl.int64) * stride_g, label, lse, coef, V, softcap, SOFTCAP, BLOCK)


@triton.jit
def logits_grad_kernel(x_ptr, labels_ptr, lse_ptr, coef_ptr, grad_ptr, V, stride_x, stride_g, softcap,
                       SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    _row_grad(x_ptr + row.to(tl.int64) * stride_x, grad_ptr + row.to(tl.int64) * stride_g, tl.load(labels_ptr + row),
              tl.load(lse_ptr + row), tl.load(coef_ptr + row), V, softcap, SOFTCAP, BLOCK)


def _device_scalar(value, device):
    """A number or a 0-d tensor (1/n_valid, kept on the device) as a float32 tensor of one element."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def _rows(logits, labels, ref, grad, *, ignore_index, softcap, weighting=None, scale=1.0):
    n, v = logits.shape
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(lp)
    coef = torch.empty_like(lp) if weighting is not None else lp
    if n:
        block, warps = row_block(v)
        logits_rows_kernel[(n,)](
            logits, labels, lp if ref is None else ref, lp, lse, coef, logits if grad is None else grad, v,
            logits.stride(0), 0 if grad is None else grad.stride(0), ignore_index, softcap or 1.0,
            _device_scalar(scale, logits.device),
            **weight_args(weighting), HAS_REF=ref is not None, SOFTCAP=softcap is not None,
            WRITE_GRAD=grad is not None, BLOCK=block, num_warps=warps)
    return lp, lse, coef


class LogitsLogprobs:
    def __init__(self, opts):
        self.opts = opts

    def forward(self, logits, labels):
        lp, lse, _ = _rows(logits, labels, None, None, ignore_index=self.opts.ignore_index, softcap=self.opts.softcap)
        return lp, (logits, labels, lse)

    def backward(self, saved, grad_lp, wanted):
        logits, labels, lse = saved
        softcap = self.opts.softcap
        coef = torch.where(labels != self.opts.ignore_index, grad_lp.float(), 0.0).contiguous()
        grad = torch.empty_like(logits)
        n, v = logits.shape
        if n:
            block, warps = row_block(v)
            logits_grad_kernel[(n,)](logits, labels, lse, coef, grad, v, logits.stride(0), grad.stride(0),
                                     softcap or 1.0, SOFTCAP=softcap is not None, BLOCK=block, num_warps=warps)
        return grad, None


def logits_logprobs(logits, labels, opts):
    return token_logprobs(LogitsLogprobs(opts), logits, labels)


def logits_weighted_loss(logits, labels, ref, opts):
    """scale · Σ_t w_t ℓ_t from logits; the gradient is written in the forward (over the logits if ``inplace``)."""

    def compute(wanted, logits):
        grad = own_storage(logits, opts.inplace) if wanted else None
        lp, _, coef = _rows(logits, labels, ref, grad, ignore_index=opts.ignore_index, softcap=opts.softcap,
                            weighting=opts.weighting, scale=opts.scale)
        return (coef * lp).sum(), grad

    return fused_logits_loss(compute, logits)
