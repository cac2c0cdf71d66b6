"""The ``cpp_cpu`` and ``cpp_cuda`` backends (aliases ``cpu``, ``cuda``): the csrc row kernels behind the
Backend contract (DESIGN §2–§3).

Hidden-state ops run in chunks of tokens: the chunk's logits by BLAS (torch matmul), then one row-kernel
call computes ℓ_t, the weight and the gradient of the logits in place in that chunk buffer, and dh, dW
(db) follow by BLAS: three matmuls per chunk and no N×V buffer. Logits-input ops call the row kernel on
the caller's logits directly, writing the gradient into them when ``inplace=True``. The CPU kernels take
float32/float64 (other dtypes are converted chunk by chunk); the CUDA kernels take all four float dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..autograd import (GradBuffers, compute_dtype, fused_head_pass, fused_logits_loss, fused_loss, own_storage,
                        row_chunks, token_logprobs)
from ..interface import Backend
from . import build


def _cap(softcap):
    return 0.0 if softcap is None else float(softcap)


def _scale_tensor(scale, device) -> torch.Tensor:
    """The loss scale (a number, or 1/n_valid as a device scalar) as the one-element float64 tensor on ``device``
    the kernels take: the CUDA kernels read it on the device, so no call waits for it there."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=torch.float64).reshape(1)
    return torch.full((1,), float(scale), dtype=torch.float64, device=device)


def _weighting_args(opts, device):
    w = opts.weighting  # its code is the formula's in csrc/include/geffect/math.h
    return dict(kind=w.code, alpha=w.alpha, beta=w.beta, gamma=w.gamma, eps=w.eps,
                scale=_scale_tensor(opts.scale, device))


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the row kernels read on t's device: CUDA reads every float dtype, CPU float32/float64."""
    return t.dtype if t.is_cuda else compute_dtype(t.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_logits(h, weight, bias):
    """A chunk's logits by BLAS, in the dtype the row kernel reads (a fresh buffer it may overwrite with their
    gradient); float32 for float16 inputs, whose gradient entries would flush to zero (see GradBuffers)."""
    z = F.linear(h, weight, bias)
    return z.float() if z.dtype == torch.float16 else z.to(_kernel_dtype(z))


def _logit_chunks(logits):
    """(rows, kernel-readable tensor) pairs: the whole tensor when the kernel reads its dtype, else
    converted copies chunk by chunk."""
    if _kernel_dtype(logits) == logits.dtype:
        return [(slice(None), _rows(logits))]
    return [(sl, logits[sl].to(_kernel_dtype(logits))) for sl in row_chunks(*logits.shape)]


class _Logprobs:
    """ℓ_t by the row kernel over chunks of head logits (BLAS) or over given logits; the backward's row
    kernel writes each chunk's logits gradient from the saved LSE."""

    def __init__(self, ext, opts):
        self.ext, self.opts = ext, opts

    def _chunks(self, rows, head):
        if not head:
            return _logit_chunks(rows)
        return ((sl, _head_logits(rows[sl], *head)) for sl in row_chunks(rows.shape[0], head[0].shape[0]))

    def forward(self, rows, *rest):  # (hidden, weight, bias, labels) or (logits, labels)
        *head, labels = rest
        out = torch.empty(labels.shape, dtype=compute_dtype(rows.dtype), device=rows.device)
        lse = torch.empty_like(out)
        for sl, z in self._chunks(rows, head):
            out[sl], lse[sl] = self.ext.row_logprobs(z, labels[sl], self.opts.ignore_index, _cap(self.opts.softcap))
        return out, (rows, *head, labels, lse)

    def backward(self, saved, grad_out, wanted):
        rows, *head, labels, lse = saved
        coef = grad_out.to(lse.dtype).contiguous()
        grads = GradBuffers(rows, *head, wanted) if head else None
        grad = None if head else torch.empty_like(rows, memory_format=torch.contiguous_format)
        for sl, z in self._chunks(rows, head):
            # head chunks and converted copies are scratch (overwritten); else write straight into `grad`
            target = z if head or z.dtype != grad.dtype else grad[sl]
            self.ext.row_grad(z, target, labels[sl], lse[sl], coef[sl], self.opts.ignore_index, _cap(self.opts.softcap))
            if head:
                grads.add(z, sl, rows, head[0])
            elif target is z:
                grad[sl] = z
        return (*grads.result(*head), None) if head else (grad, None)


@torch.compiler.assume_constant_result  # a first call builds the extension: torch.compile runs it while tracing
def _extension_available(kind):
    return build.available(kind)


class _CsrcBackend(Backend):
    kind = "abstract"

    def is_available(self, device):
        return torch.device(device).type == self.kind and _extension_available(self.kind)

    @property
    def ext(self):
        return build.load(self.kind)

    def logprobs_kernels(self, opts):
        return _Logprobs(self.ext, opts)

    def token_logprobs(self, hidden, weight, bias, labels, opts):
        return token_logprobs(_Logprobs(self.ext, opts), hidden, weight, bias, labels)

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, opts):
        if opts.weighting.code is None:  # no kernel formula: the kernels' log-probabilities, torch's weights
            return super().weighted_loss(hidden, weight, bias, labels, ref_logprobs, opts)
        ext = self.ext
        weighting = _weighting_args(opts, hidden.device)

        def chunk_loss(sl, want_grad):  # the kernel overwrites the chunk's logits with their gradient
            z = _head_logits(hidden[sl], weight, bias)
            logprobs, coef = ext.row_weighted_loss(z, z if want_grad else None, labels[sl],
                                                   None if ref_logprobs is None else ref_logprobs[sl],
                                                   opts.ignore_index, _cap(opts.softcap), **weighting)
            return (coef.double() * logprobs.double()).sum(), z if want_grad else None

        return fused_loss(lambda wanted, *head: _in_compute_dtype(fused_head_pass(*head, wanted, chunk_loss,
                                                                                  torch.float64), hidden),
                          hidden, weight, bias)

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts):
        ext = self.ext
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
        scale = _scale_tensor(opts.scale, hidden.device)

        def chunk_loss(sl, want_grad):  # the kernel overwrites the chunk's logits with their gradient
            z = _head_logits(hidden[sl], weight, bias)
            z_ref = _head_logits(ref_hidden[sl], ref_weight, ref_bias)
            kl = ext.row_kl(z, z_ref, z if want_grad else None, labels[sl], opts.ignore_index, _cap(opts.softcap),
                            scale)
            return kl.double().sum() * opts.scale, z if want_grad else None

        return fused_loss(lambda wanted, *head: _in_compute_dtype(fused_head_pass(*head, wanted, chunk_loss,
                                                                                  torch.float64), hidden),
                          hidden, weight, bias)

    def target_cross_entropy(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, beta):
        ext = self.ext
        own = ref_hidden is None
        if not own:
            ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
            ref_bias = None if ref_bias is None else ref_bias.detach()
        scale = _scale_tensor(opts.scale, hidden.device)

        def chunk_loss(sl, want_grad):  # the kernel overwrites the chunk's logits with their gradient
            z = _head_logits(hidden[sl], weight, bias)
            z_ref = None if own else _head_logits(ref_hidden[sl], ref_weight, ref_bias)
            ce = ext.row_target_ce(z, z_ref, z if want_grad else None, labels[sl], opts.ignore_index,
                                   _cap(opts.softcap), scale, float(beta))
            return ce.double().sum() * opts.scale, z if want_grad else None

        return fused_loss(lambda wanted, *head: _in_compute_dtype(fused_head_pass(*head, wanted, chunk_loss,
                                                                                  torch.float64), hidden),
                          hidden, weight, bias)

    def token_stats(self, hidden, weight, bias, labels, opts):
        ext = self.ext
        out = [torch.empty(labels.shape, dtype=compute_dtype(hidden.dtype), device=hidden.device) for _ in range(3)]
        for sl in row_chunks(hidden.shape[0], weight.shape[0]):
            z = _head_logits(hidden[sl], weight, bias)
            for buffer, part in zip(out, ext.row_token_stats(z, labels[sl], opts.ignore_index, _cap(opts.softcap))):
                buffer[sl] = part
        return tuple(out)

    def logits_logprobs_kernels(self, opts):
        return _Logprobs(self.ext, opts)

    def token_logprobs_from_logits(self, logits, labels, opts):
        return token_logprobs(_Logprobs(self.ext, opts), logits, labels)

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, opts):
        if opts.weighting.code is None:
            return super().weighted_loss_from_logits(logits, labels, ref_logprobs, opts)
        ext = self.ext

        def compute(wanted, logits):
            grad = own_storage(logits, opts.inplace) if wanted else None
            loss = torch.zeros((), dtype=torch.float64, device=logits.device)
            weighting = _weighting_args(opts, logits.device)
            for sl, z in _logit_chunks(logits):
                # the kernel writes the gradient straight into `grad`, or into a converted copy `z` first
                target = None if grad is None else grad[sl] if z.dtype == grad.dtype else z
                logprobs, coef = ext.row_weighted_loss(z, target, labels[sl],
                                                       None if ref_logprobs is None else ref_logprobs[sl],
                                                       opts.ignore_index, _cap(opts.softcap), **weighting)
                loss += (coef.double() * logprobs.double()).sum()
                if target is z:
                    grad[sl] = z
            return loss.to(compute_dtype(logits.dtype)), grad

        return fused_logits_loss(compute, logits)


def _in_compute_dtype(result, hidden):
    """(float64 loss, grads) of a fused head pass with the loss in the inputs' compute dtype."""
    loss, grads = result
    return loss.to(compute_dtype(hidden.dtype)), grads


class CpuBackend(_CsrcBackend):
    name, kind = "cpp_cpu", "cpu"


class CudaBackend(_CsrcBackend):
    name, kind = "cpp_cuda", "cuda"

    def is_available(self, device):
        return torch.cuda.is_available() and super().is_available(device)


BACKENDS = {"cpp_cpu": CpuBackend(), "cpp_cuda": CudaBackend()}
