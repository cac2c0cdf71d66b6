"""The ``triton`` backend: CUDA tensors in float16/bfloat16/float32; CPU float32 under TRITON_INTERPRET=1.

`accepts` names the inputs the kernels do not take (float64 anywhere; 16-bit types in the CPU interpreter,
whose bf16 arithmetic is not trustworthy; empty batches): the registry sends those to the chunked torch
backend, which computes the same quantities.
"""
import functools

import torch

from ..interface import Backend
from .config import interpreting
from .fused_weighted import HeadLogprobs, head_logprobs_op, weighted_head_loss
from .kl import fused_kl, fused_target_ce
from .logits_rowwise import LogitsLogprobs, logits_logprobs, logits_weighted_loss
from .token_stats import head_token_stats


def _rowmajor(t):
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def _on_inputs_device(method):
    """Run ``method`` under its inputs' CUDA device guard: Triton launches on the *current* device, so cuda:1
    tensors with cuda:0 current would otherwise be handed to kernels running on the wrong GPU. (Backward
    passes run on autograd's worker thread for the tensors' device, which sets it.)"""
    @functools.wraps(method)
    def guarded(self, rows, *args, **kwargs):
        if not rows.is_cuda:
            return method(self, rows, *args, **kwargs)
        with torch.cuda.device(rows.device):
            return method(self, rows, *args, **kwargs)
    return guarded


class TritonBackend(Backend):
    name = "triton"

    def is_available(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available()
        return device.type == "cpu" and interpreting()

    def accepts(self, rows):
        if rows.shape[0] == 0:  # nothing to launch
            return False
        if rows.device.type == "cuda":
            return rows.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return rows.dtype == torch.float32  # the interpreter

    def logprobs_kernels(self, opts):
        return HeadLogprobs(opts)

    @_on_inputs_device
    def token_logprobs(self, hidden, weight, bias, labels, opts):
        return head_logprobs_op(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), labels.contiguous(), opts)

    @_on_inputs_device
    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, opts):
        if opts.weighting.code is None:  # no kernel formula: the kernels' log-probabilities, torch's weights
            return super().weighted_loss(hidden, weight, bias, labels, ref_logprobs, opts)
        return weighted_head_loss(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), labels.contiguous(),
                                  _float32(ref_logprobs), opts)

    @_on_inputs_device
    def token_stats(self, hidden, weight, bias, labels, opts):
        return head_token_stats(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), labels.contiguous(),
                                ignore_index=opts.ignore_index, softcap=opts.softcap)

    @_on_inputs_device
    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts):
        ref_bias = None if ref_bias is None else _rowmajor(ref_bias.detach())
        return fused_kl(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), _rowmajor(ref_hidden.detach()),
                        _rowmajor(ref_weight.detach()), ref_bias, labels.contiguous(), opts)

    @_on_inputs_device
    def target_cross_entropy(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, opts, beta):
        if ref_hidden is not None:
            ref_hidden, ref_weight = _rowmajor(ref_hidden.detach()), _rowmajor(ref_weight.detach())
            ref_bias = None if ref_bias is None else _rowmajor(ref_bias.detach())
        return fused_target_ce(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), ref_hidden, ref_weight, ref_bias,
                               labels.contiguous(), opts, beta)

    def logits_logprobs_kernels(self, opts):
        return LogitsLogprobs(opts)

    @_on_inputs_device
    def token_logprobs_from_logits(self, logits, labels, opts):
        return logits_logprobs(_rowmajor(logits), labels.contiguous(), opts)

    @_on_inputs_device
    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, opts):
        if opts.weighting.code is None:
            return super().weighted_loss_from_logits(logits, labels, ref_logprobs, opts)
        # a row-major copy made here cannot be the caller's buffer: in place only without one
        return logits_weighted_loss(_rowmajor(logits), labels.contiguous(), _float32(ref_logprobs), opts)


def _float32(ref_logprobs):
    return None if ref_logprobs is None else ref_logprobs.float().contiguous()


BACKENDS = {"triton": TritonBackend()}
