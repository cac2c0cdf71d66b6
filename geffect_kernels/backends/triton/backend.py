"""The ``triton`` backend: CUDA tensors in float16/bfloat16/float32; CPU float32 under TRITON_INTERPRET=1.

`accepts` names the inputs the kernels do not take (float64 anywhere; 16-bit types in the CPU interpreter,
whose bf16 arithmetic is not trustworthy; empty batches): the registry sends those to the chunked torch
backend, which computes the same quantities.
"""
import torch

from ..autograd import grads_wanted
from ..interface import Backend
from .config import interpreting
from .fused_weighted import FusedWeightedLoss, HeadLogprobs
from .kl import FusedKL
from .logits_rowwise import LogitsLogprobs, LogitsWeightedLoss


def _rowmajor(t):
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


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

    def token_logprobs(self, hidden, weight, bias, labels, *, ignore_index, softcap):
        return HeadLogprobs.apply(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), labels.contiguous(),
                                  ignore_index, softcap)

    def weighted_loss(self, hidden, weight, bias, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale):
        ref = None if ref_logprobs is None else ref_logprobs.float().contiguous()
        return FusedWeightedLoss.apply(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), labels.contiguous(),
                                       ref, ignore_index, softcap, weighting, scale, grads_wanted(hidden, weight, bias))

    def kl_divergence(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, ignore_index,
                      softcap, scale):
        ref_bias = None if ref_bias is None else _rowmajor(ref_bias.detach())
        return FusedKL.apply(_rowmajor(hidden), _rowmajor(weight), _rowmajor(bias), _rowmajor(ref_hidden.detach()),
                             _rowmajor(ref_weight.detach()), ref_bias, labels.contiguous(), ignore_index, softcap,
                             scale, grads_wanted(hidden, weight, bias))

    def token_logprobs_from_logits(self, logits, labels, *, ignore_index, softcap):
        return LogitsLogprobs.apply(_rowmajor(logits), labels.contiguous(), ignore_index, softcap)

    def weighted_loss_from_logits(self, logits, labels, ref_logprobs, *, ignore_index, softcap, weighting, scale,
                                  inplace=False):
        ref = None if ref_logprobs is None else ref_logprobs.float().contiguous()
        wanted = grads_wanted(logits)[0]
        # in place only where the caller's buffer itself is the gradient's home (not a copy made here)
        inplace = inplace and wanted and logits.stride(-1) == 1
        return LogitsWeightedLoss.apply(_rowmajor(logits), labels.contiguous(), ref, ignore_index, softcap, weighting,
                                        scale, wanted, inplace)


BACKENDS = {"triton": TritonBackend()}
