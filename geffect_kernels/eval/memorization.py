"""Exact memorization and extraction strength, as open-unlearning defines them (``exact_memorization`` and
``extraction_strength`` in ``src/evals/metrics/memorization.py``), from whether each answer token is the model's
argmax (teacher-forced). Both leave out the last labeled token (the end-of-sequence token), as open-unlearning's
``tokenwise_vocab_logprobs`` does.

- exact memorization: the share of answer tokens that are the argmax;
- extraction strength: 1 − k/n with k the first position from which every later token is the argmax (the
  shortest prefix after which the rest is reproduced). Where not even the last token is, open-unlearning's loop
  ends at k = n − 1 and gives 1/n, not 0; kept as it is for comparable numbers.
"""
from __future__ import annotations

import numpy as np


def _answer_hits(argmax_hit):
    hits = np.asarray(argmax_hit, dtype=bool)
    return hits[:max(len(hits) - 1, 0)]


def exact_memorization(argmax_hit) -> float | None:
    """Share of answer tokens (without the last) that are the argmax; None without any."""
    hits = _answer_hits(argmax_hit)
    return float(hits.mean()) if hits.size else None


def extraction_strength(argmax_hit) -> float:
    """1 − k/n, k the start of the longest reproduced suffix (open-unlearning's loop, 1/n when none); 0 on none."""
    hits = _answer_hits(argmax_hit)
    n = len(hits)
    if n == 0:
        return 0.0
    k = 0
    for k in range(n):
        if hits[k:].all():
            break
    return 1 - k / n


__all__ = ["exact_memorization", "extraction_strength"]
