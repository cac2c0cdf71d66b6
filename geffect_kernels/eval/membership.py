"""Membership inference: per-sample attack scores, the AUC of forget against holdout, and privleak.

Scores follow open-unlearning (``src/evals/metrics/mia/``): higher means *less* likely a member, like a loss.
Per sample, over the answer tokens:

- ``loss``: the mean negative log-likelihood over every labeled token (the end-of-sequence token included);
- ``zlib``: that loss divided by the zlib-compressed length in bytes of the answer text;
- ``min_k``: minus the mean of the lowest k·n token log-probabilities (at least one), k = 0.4;
- ``min_k++``: the same over (log p(y_t) − μ_t) / σ_t, with μ_t = E_{p_t}[log p] = −entropy and σ_t² the variance
  of log p under p_t (clamped at 1e-6).

min-k and min-k++ leave out the last labeled token (the end-of-sequence token), as open-unlearning does.

``mia_auc``: the area under the ROC curve with the forget set labeled 0 and the holdout set 1 (open-unlearning's
convention: 1 when the forget samples look far more like members than the holdout ones, 0.5 when the attack cannot
tell them apart). ``privleak`` is MUSE's, which scores the opposite way round (AUC_MUSE = 1 − mia_auc):
(AUC_MUSE(model) − AUC_MUSE(retain model)) / AUC_MUSE(retain model) × 100 — near 0 when the unlearned model leaks
as little as the retain model, negative when its forget set still looks memorized.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

MIN_K = 0.4  # open-unlearning's and MUSE's k for min-k% and min-k%++
ATTACKS = ("loss", "zlib", "min_k", "min_k++")
PRIVLEAK_ATTACK = "min_k"  # MUSE's privleak: Min-40%
VARIANCE_FLOOR = 1e-6  # keeps min-k%++'s σ_t above 0 where p_t is (numerically) one-hot


def loss_score(logprobs) -> float:
    logprobs = np.asarray(logprobs, dtype=np.float64)
    return float(-logprobs.mean()) if logprobs.size else 0.0


def zlib_score(logprobs, text: str) -> float:
    return loss_score(logprobs) / len(zlib.compress(text.encode("utf-8")))


def _lowest_k_mean(values, k) -> float:
    values = np.sort(np.asarray(values, dtype=np.float64))
    if values.size == 0:
        return 0.0
    return float(-values[:max(1, int(len(values) * k))].mean())


def min_k_score(logprobs, k=MIN_K) -> float:
    """Minus the mean of the lowest ``k`` share of the token log-probabilities."""
    return _lowest_k_mean(logprobs, k)


def min_k_plus_plus_score(logprobs, entropy, logprob_var, k=MIN_K) -> float:
    """`min_k_score` of (log p(y_t) − μ_t)/σ_t, μ_t = −entropy_t, σ_t² = Var_{p_t}[log p] (floored)."""
    mu = -np.asarray(entropy, dtype=np.float64)
    sigma = np.sqrt(np.maximum(np.asarray(logprob_var, dtype=np.float64), VARIANCE_FLOOR))
    return _lowest_k_mean((np.asarray(logprobs, dtype=np.float64) - mu) / sigma, k)


def attack_scores(stats, text: str) -> dict:
    """Every attack's score of one sample from its `token_stats.SampleStats` and its answer text."""
    head = slice(0, max(len(stats.logprob) - 1, 0))  # min-k, min-k++: without the end-of-sequence token
    return {"loss": loss_score(stats.logprob), "zlib": zlib_score(stats.logprob, text),
            "min_k": min_k_score(stats.logprob[head]),
            "min_k++": min_k_plus_plus_score(stats.logprob[head], stats.entropy[head], stats.logprob_var[head])}


def auc(forget_scores, holdout_scores) -> float:
    """ROC AUC with forget labeled 0 and holdout 1: P(holdout score > forget score), ties counted half."""
    forget = np.asarray(forget_scores, dtype=np.float64)
    holdout = np.asarray(holdout_scores, dtype=np.float64)
    if forget.size == 0 or holdout.size == 0:
        raise ValueError("the AUC needs scores on both the forget and the holdout set")
    if np.isnan(forget).any() or np.isnan(holdout).any():
        raise ValueError("membership scores contain NaN")
    greater = (holdout[None, :] > forget[:, None]).sum()
    ties = (holdout[None, :] == forget[:, None]).sum()
    return float((greater + 0.5 * ties) / (forget.size * holdout.size))


def attack_columns(per_sample: dict) -> dict:
    """``{attack: per-sample scores}`` from the ``mia_<attack>`` lists of a per-sample evaluation (as
    `likelihood.memorization_scores` writes them), for the attacks it holds."""
    return {name: per_sample[f"mia_{name}"] for name in ATTACKS if f"mia_{name}" in per_sample}


def mia_auc(forget_scores: dict, holdout_scores: dict) -> dict:
    """``{attack: AUC}`` from per-sample score lists of each attack on both sets."""
    return {name: auc(forget_scores[name], holdout_scores[name]) for name in ATTACKS
            if name in forget_scores and name in holdout_scores}


def privleak(model_auc: float, retain_model_auc: float) -> float:
    """MUSE's PrivLeak in percent from two `auc` values (open-unlearning's convention, converted to MUSE's)."""
    model, reference = 1 - model_auc, 1 - retain_model_auc
    if reference == 0 or math.isnan(reference):
        raise ValueError(f"privleak is undefined when the retain model's AUC is {retain_model_auc}")
    return (model - reference) / reference * 100


__all__ = ["ATTACKS", "MIN_K", "PRIVLEAK_ATTACK", "attack_columns", "attack_scores", "auc", "loss_score", "mia_auc",
           "min_k_plus_plus_score", "min_k_score", "privleak", "zlib_score"]
