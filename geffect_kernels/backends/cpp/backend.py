"""The ``cpp_cpu`` and ``cpp_cuda`` backends (aliases ``cpu``, ``cuda``): the csrc row kernels behind the Backend contract (DESIGN §2–§3).

Hidden-state ops run in chunks of tokens: the chunk's logits by BLAS (torch matmul), then one row-kernel
call computes ℓ_t, the weight and the gradient of the logits in place in that chunk buffer, and dh, dW
(db) follow by BLAS: three matmuls per chunk and no N×V buffer. Logits-input ops call the row kernel on
the caller's logits directly, writing the gradient into them when ``inplace=True``. The CPU kernels take
float32/float64 (other dtypes are converted chunk by chunk); the CUDA kernels take all four float dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...inputs import out_dtype
from ..autograd import GradBuffers, fused_head_pass, grads_wanted, handed_over_grad, row_chunks, scaled_grads
from ..interface import Backend
from . import build

_WEIGHT_CODES = {"one": 0, "wga": 1, "satimp": 2, "tnpo": 3, "wtnpo": 4}  # csrc/include/geffect/math.h


def _cap(softcap):
    return 0.0 if softcap is None else float(softcap)


def _weighting_args(weighting, scale):
    return dict(kind=_WEIGHT_CODES[weighting.kind], alpha=weighting.alpha, beta=weighting.beta,
                gamma=weighting.gamma, scale=float(scale))


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the row kernels read on t's device: CUDA reads every float dtype, CPU float32/float64."""
    return t.dtype if t.is_cuda else out_dtype(t.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_logits(h, weight, bias):
    """A chunk's logits by BLAS, in the dtype the row kernel reads (a fresh buffer it may overwrite)."""
    z = F.linear(h, weight, bias)
    return z.to(_kernel_dtype(z))


class _Logprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, hidden, weight, bias, labels, ignore_index, softcap):
        out = torch.empty(labels.shape, dtype=out_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(out)
        for sl in row_chunks(hidden.shape[0], weight.shape[0]):
            out[sl], lse[sl] = ext.row_logprobs(_head_logits(hidden[sl], weight, bias), labels[sl], ignore_index,
                                                _cap(softcap))
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ext, ctx.ignore_index, ctx.softcap = ext, ignore_index, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = GradBuffers(hidden, weight, bias, ctx.needs_input_grad[1:4])
        coef = grad_out.to(lse.dtype).contiguous()
        for sl in row_chunks(hidden.shape[0], weight.shape[0]):
            z = _head_logits(hidden[sl], weight, bias)
            ctx.ext.row_grad(z, z, labels[sl], lse[sl], coef[sl], ctx.ignore_index, _cap(ctx.softcap))
            grads.add(z, sl, hidden, weight)
        return (None, *grads.result(weight, bias), None, None, None)


class _WeightedLoss(torch.autograd.Function):
    """scale · Σ_t w_t ℓ_t; the gradients are produced in the forward pass."""

    @staticmethod
    def forward(ctx, ext, hidden, weight, bias, labels, ref, ignore_index, softcap, weighting, scale, wanted):
        def chunk_loss(sl, want_grad):  # the kernel overwrites the chunk's logits with their gradient
            z = _head_logits(hidden[sl], weight, bias)
            logprobs, coef = ext.row_weighted_loss(z, z if want_grad else None, labels[sl],
                                                   None if ref is None else ref[sl], ignore_index, _cap(softcap),
                                                   **_weighting_args(weighting, scale))
            return (coef.double() * logprobs.double()).sum(), z if want_grad else None

        loss, ctx.grads = fused_head_pass(hidden, weight, bias, wanted, chunk_loss, torch.float64)
        return loss.to(out_dtype(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *scaled_grads(ctx.grads, grad_out), *([None] * 7))


class _KL(torch.autograd.Function):
    """scale · Σ_valid KL(p_ref,t ‖ p_θ,t); θ-side gradients produced in the forward pass."""

    @staticmethod
    def forward(ctx, ext, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index, softcap,
                scale, wanted):
        def chunk_loss(sl, want_grad):  # the kernel overwrites the chunk's logits with their gradient
            z = _head_logits(hidden[sl], weight, bias)
            z_ref = _head_logits(ref_hidden[sl], ref_weight, ref_bias)
            kl = ext.row_kl(z, z_ref, z if want_grad else None, labels[sl], ignore_index, _cap(softcap), scale)
            return kl.double().sum() * scale, z if want_grad else None

        loss, ctx.grads = fused_head_pass(hidden, weight, bias, wanted, chunk_loss, torch.float64)
        return loss.to(out_dtype(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *scaled_grads(ctx.grads, grad_out), *([None] * 8))


def _logit_chunks(logits):
    """(rows, kernel-readable tensor) pairs: the whole tensor when the kernel reads its dtype, else
    converted copies chunk by chunk."""
    if _kernel_dtype(logits) == logits.dtype:
        return [(slice(None), _rows(logits))]
    return [(sl, logits[sl].to(_kernel_dtype(logits))) for sl in row_chunks(*logits.shape)]


class _LogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, logits, labels, ignore_index, softcap):
        out = torch.empty(labels.shape, dtype=out_dtype(logits.dtype), device=logits.device)
        lse = torch.empty_like(out)
        for sl, z in _logit_chunks(logits):
            out[sl], lse[sl] = ext.row_logprobs(z, labels[sl], ignore_index, _cap(softcap))
        ctx.save_for_backward(logits, labels, lse)
        ctx.ext, ctx.ignore_index, ctx.softcap = ext, ignore_index, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        coef = grad_out.to(lse.dtype).contiguous()
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for sl, z in _logit_chunks(logits):
            target = grad[sl] if z.dtype == grad.dtype else z
            ctx.ext.row_grad(z, target, labels[sl], lse[sl], coef[sl], ctx.ignore_index, _cap(ctx.softcap))
            if target is z:
                grad[sl] = z
        return None, grad, None, None, None


class _LogitsWeightedLoss(torch.autograd.Function):
    """scale · Σ_t w_t ℓ_t from given logits; the gradient goes into ``logits`` itself when ``inplace``."""

    @staticmethod
    def forward(ctx, ext, logits, labels, ref, ignore_index, softcap, weighting, scale, inplace, wanted):
        grad = None
        if wanted:
            # detach(): a new tensor object on the same storage, which autograd can take over as the
            # gradient without a copy (the input object itself it would copy)
            grad = logits.detach() if inplace and logits.stride(-1) == 1 else torch.empty_like(
                logits, memory_format=torch.contiguous_format)
        loss = torch.zeros((), dtype=torch.float64, device=logits.device)
        for sl, z in _logit_chunks(logits):
            # the kernel writes the gradient straight into `grad`, or into a converted copy `z` first
            target = None if grad is None else grad[sl] if z.dtype == grad.dtype else z
            logprobs, coef = ext.row_weighted_loss(z, target, labels[sl], None if ref is None else ref[sl],
                                                   ignore_index, _cap(softcap), **_weighting_args(weighting, scale))
            loss += (coef.double() * logprobs.double()).sum()
            if target is z:
                grad[sl] = z
        ctx.grad = grad
        return loss.to(out_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return None, handed_over_grad(ctx, grad_out), *([None] * 8)


class _CsrcBackend(Backend):
    kind = "abstract"

    def is_available(self, device):
        return torch.device(device).type == self.kind and build.available(self.kind)

    @property
    def ext(self):
        return build.load(self.kind)

    def token_logprobs(self, hidden, weight, bias, labels, *, ignore_index, softcap):
        return _Logprobs.apply(self.ext, hidden, weight, bias, labels, ignore_index, softcap)

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale):
        return _WeightedLoss.apply(self.ext, hidden, weight, bias, labels, ref_logprobs, ignore_index, softcap,
                                   weighting, scale, grads_wanted(hidden, weight, bias))

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, ignore_index, softcap,
                      scale):
        return _KL.apply(self.ext, hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                         None if ref_bias is None else ref_bias.detach(), labels, ignore_index, softcap, scale,
                         grads_wanted(hidden, weight, bias))

    def token_logprobs_from_logits(self, logits, labels, *, ignore_index, softcap):
        return _LogitsLogprobs.apply(self.ext, logits, labels, ignore_index, softcap)

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale,
                                  inplace=False):
        return _LogitsWeightedLoss.apply(self.ext, logits, labels, ref_logprobs, ignore_index, softcap, weighting,
                                         scale, inplace, grads_wanted(logits)[0])


class CpuBackend(_CsrcBackend):
    name, kind = "cpp_cpu", "cpu"


class CudaBackend(_CsrcBackend):
    name, kind = "cpp_cuda", "cuda"

    def is_available(self, device):
        return torch.cuda.is_available() and super().is_available(device)


BACKENDS = {"cpp_cpu": CpuBackend(), "cpp_cuda": CudaBackend()}
