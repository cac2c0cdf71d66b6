"""ROUGE-L recall: the longest common subsequence of words over the reference's length (TOFU's ROUGE
metric). Words are lower-cased alphanumeric runs, as in the ``rouge_score`` package (no stemming)."""
from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of sequences ``a`` and ``b`` (one DP row, O(|a|·|b|))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_recall(reference: str, candidate: str) -> float:
    """LCS(reference, candidate) / |reference| in words; 0 for an empty reference."""
    ref = words(reference)
    return lcs_length(ref, words(candidate)) / len(ref) if ref else 0.0
