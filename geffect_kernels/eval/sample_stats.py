"""Per-token statistics of a model's next-token distribution at the answer tokens, per sample.

For each labeled position t (after the Hugging Face shift): log p(y_t), the entropy of p_t and the variance of
log p under p_t (the fused `geffect_kernels.token_stats`: one pass over the vocabulary, no N×V logits; what
min-k%++ normalizes with, μ_t = −entropy, σ_t² the variance), and whether y_t is the argmax (exact memorization,
extraction strength), from the head applied to the labeled rows a chunk at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import hf
from ..catalog import IGNORE_INDEX
from ..data.prompts import collate
from ..token_distribution import token_stats

# logits the argmax pass holds at once (rows × vocabulary): bounds its memory whatever the vocabulary; a larger
# block only saves per-chunk matmul calls
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SampleStats:
    """One sample's labeled positions, in order; float64 arrays."""

    target_ids: list
    logprob: np.ndarray
    entropy: np.ndarray
    logprob_var: np.ndarray
    argmax_hit: np.ndarray  # bool


def argmax_hits(hidden, weight, labels, *, bias=None, softcap=None) -> torch.Tensor:
    """Whether each label is the argmax of its row's logits (rows ``hidden`` [N, H], ``labels`` [N], all valid),
    a chunk of rows at a time. Soft-capping is monotone, so it cannot move the argmax; it is left out."""
    del softcap
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # half precision would tie rows
    rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    hits = [labels.new_zeros(0, dtype=torch.bool)]
    for start in range(0, hidden.shape[0], rows):
        z = hidden[start:start + rows].to(dtype) @ weight.to(dtype).T
        if bias is not None:
            z = z + bias.to(dtype)
        hits.append(z.argmax(-1) == labels[start:start + rows])
    return torch.cat(hits)


def head_stats(hidden, weight, labels, *, bias=None, softcap=None):
    """``(logprob, entropy, logprob_var, argmax_hit)`` of each valid row (``hidden`` [N, H], ``labels`` [N])."""
    stats = token_stats(hidden, weight, labels, bias=bias, softcap=softcap)
    return (stats.logprob, stats.entropy, stats.logprob_var,
            argmax_hits(hidden, weight, labels, bias=bias, softcap=softcap))


@torch.no_grad()
def sample_stats(model, examples, pad_id, *, batch_size=32) -> list[SampleStats]:
    """`SampleStats` of each encoded example (``input_ids`` and ``labels`` lists, labels `IGNORE_INDEX` where
    unscored)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        x = hf.head_inputs(model, batch)
        labels = x.labels[:, 1:]
        valid = labels != IGNORE_INDEX
        columns = head_stats(x.hidden[:, :-1][valid], x.weight, labels[valid], bias=x.bias, softcap=x.softcap)
        counts = valid.sum(-1).tolist()
        pieces = [torch.split(c.detach().cpu(), counts) for c in columns]
        targets = torch.split(labels[valid].cpu(), counts)
        for lp, ent, var, hit, y in zip(*pieces, targets):
            out.append(SampleStats(y.tolist(), lp.double().numpy(), ent.double().numpy(), var.double().numpy(),
                                   hit.numpy()))
    return out


__all__ = ["SampleStats", "argmax_hits", "head_stats", "sample_stats"]
