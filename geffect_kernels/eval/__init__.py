"""Evaluation: TOFU's metrics (answer probability, ROUGE-L recall, truth ratio, forget quality, model utility),
membership inference and memorization (open-unlearning's attacks, MUSE's privleak), and MUSE's three metrics."""
from . import membership, memorization, sample_stats
from .likelihood import greedy_answers, mean_answer_logprobs, memorization_scores
from .membership import attack_scores, auc, mia_auc, privleak
from .memorization import exact_memorization, extraction_strength
from .rouge import rouge_l_recall
from .tofu import (answer_probability, evaluate_model, forget_quality, harmonic_mean, score_set, summarize,
                   truth_ratio, truth_score)

__all__ = ["answer_probability", "attack_scores", "auc", "evaluate_model", "exact_memorization",
           "extraction_strength", "forget_quality", "greedy_answers", "harmonic_mean", "mean_answer_logprobs",
           "memorization", "memorization_scores", "membership", "mia_auc", "privleak", "rouge_l_recall",
           "sample_stats", "score_set", "summarize", "truth_ratio", "truth_score"]
