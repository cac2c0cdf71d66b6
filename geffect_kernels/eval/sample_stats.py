"""Per-token statistics of a model's next-token distribution at the answer tokens, per sample.

For each labeled position t (after the Hugging Face shift): log p(y_t), the entropy of p_t, the variance of
log p under p_t (what min-k%++ normalizes with: μ_t = −entropy, σ_t² the variance), and whether y_t is the
argmax (exact memorization, extraction strength). The head is applied to the labeled rows only, a chunk of
rows at a time, so the N×V logits of a whole batch never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import hf
from ..data.prompts import IGNORE_INDEX, collate

_CHUNK_ELEMENTS = 1 << 24  # logits held at once by the chunked pass (rows × vocabulary)


@dataclass(frozen=True)
class SampleStats:
    """One sample's labeled positions, in order; float64 arrays."""

    target_ids: list
    logprob: np.ndarray
    entropy: np.ndarray
    logprob_var: np.ndarray
    argmax_hit: np.ndarray  # bool


def _logits(hidden, weight, bias, softcap):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def chunked_head_stats(hidden, weight, labels, *, bias=None, softcap=None, with_distribution=True):
    """``(logprob, entropy, logprob_var, argmax_hit)`` for rows ``hidden`` [N, H] and ``labels`` [N] (all
    valid), a chunk of rows at a time; the first three are None unless ``with_distribution``."""
    rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    hits, logprobs, entropies, variances = [labels.new_zeros(0, dtype=torch.bool)], [], [], []
    for start in range(0, hidden.shape[0], rows):
        z = _logits(hidden[start:start + rows], weight, bias, softcap)
        y = labels[start:start + rows]
        hits.append(z.argmax(-1) == y)
        if with_distribution:
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            entropy = -(p * logp).sum(-1)
            # Var[log p] = Σ p (log p − E[log p])² with E[log p] = −entropy: no difference of two large sums
            variances.append((p * (logp + entropy.unsqueeze(-1)).square()).sum(-1))
            entropies.append(entropy)
            logprobs.append(logp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    hit = torch.cat(hits)
    if not with_distribution:
        return None, None, None, hit
    empty = [hidden.new_zeros(0, dtype=torch.float64)]
    return (*(torch.cat(c or empty) for c in (logprobs, entropies, variances)), hit)


def _fused_token_stats():
    """The package's fused `token_stats` function where this install has it, else None."""
    import geffect_kernels

    found = getattr(geffect_kernels, "token_stats", None)
    return found if callable(found) else getattr(found, "token_stats", None)


def head_stats(hidden, weight, labels, *, bias=None, softcap=None):
    """Per valid row: log-probability, entropy, variance of log p (the fused `token_stats` where the package
    has it, in the same one pass over the vocabulary as the log-likelihood) and the argmax hit."""
    fused = _fused_token_stats()
    if fused is None:
        return chunked_head_stats(hidden, weight, labels, bias=bias, softcap=softcap)
    stats = fused(hidden, weight, labels, bias=bias, softcap=softcap)
    logprob, entropy, variance = (stats.logprob, stats.entropy, stats.logprob_var) if hasattr(stats, "logprob") \
        else stats
    hit = chunked_head_stats(hidden, weight, labels, bias=bias, softcap=softcap, with_distribution=False)[3]
    return logprob, entropy, variance, hit


@torch.no_grad()
def sample_stats(model, examples, pad_id, *, batch_size=32) -> list[SampleStats]:
    """`SampleStats` of each encoded example (``input_ids`` and ``labels`` lists, labels -100 where unscored)."""
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


__all__ = ["SampleStats", "chunked_head_stats", "head_stats", "sample_stats"]
