"""ROUGE-L recall as TOFU and open-unlearning compute it: the ``rouge-score`` package's ROUGE-L with Porter
stemming, recall = LCS(reference, candidate) / |reference| over its tokens."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reference: str, candidate: str) -> float:
    """ROUGE-L recall of ``candidate`` against ``reference`` (0 for an empty reference)."""
    return float(_scorer().score(reference, candidate)["rougeL"].recall)
