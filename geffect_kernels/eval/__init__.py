"""TOFU-style evaluation: answer probability, ROUGE-L recall, truth ratio, forget quality, model utility."""
from .likelihood import greedy_answers, mean_answer_logprobs
from .rouge import rouge_l_recall
from .tofu import (answer_probability, evaluate_model, forget_quality, harmonic_mean, score_set, summarize,
                   truth_ratio, truth_score)

__all__ = ["answer_probability", "evaluate_model", "forget_quality", "greedy_answers", "harmonic_mean",
           "mean_answer_logprobs", "rouge_l_recall", "score_set", "summarize", "truth_ratio",
           "truth_score"]
