"""TOFU's metrics (Maini et al., 2024), from per-sample length-normalized log-probabilities.

- answer probability: P(a|q)^(1/|a|); on sets of general knowledge (real authors, world facts) it is
  normalized over the options, P(a)^(1/|a|) / (P(a)^(1/|a|) + Σ_j P(a_j)^(1/|a_j|)) with a_j the perturbed answers;
- ROUGE-L recall (``rouge-score``, Porter stemming) of the greedy answer (up to 200 new tokens) against the true
  answer;
- truth ratio R = (geometric mean over j of P(a_j)^(1/|a_j|)) / P(ã)^(1/|ã|), ã the paraphrased answer
  (TOFU's code averages in log space); reported as mean max(0, 1 − R) on retain-type sets and as
  mean min(R, 1/R) on the forget set;
- forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the forget-set truth
  ratios of the unlearned model and of a model trained on the retain data only;
- model utility: the harmonic mean of nine numbers, probability, ROUGE-L and truth-ratio score on each of the
  retain, real-authors and world-facts sets. With fewer sets the harmonic mean is called after them
  (``retain_utility``, ``retain_world_utility``, ...), never ``model_utility``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import ks_2samp

from ..data.prompts import encode_pair
from ..model_mode import eval_mode
from .likelihood import greedy_answers, mean_answer_logprobs, memorization_scores
from .membership import PRIVLEAK_ATTACK, attack_columns, mia_auc, privleak
from .rouge import rouge_l_recall

UTILITY_SETS = ("retain", "real_authors", "world")
UTILITY_METRICS = ("probability", "rouge_l", "truth")
NORMALIZED_SETS = ("real_authors", "world")  # answer probability normalized over the options (TOFU)
MAX_NEW_TOKENS = 200  # greedy generation length for ROUGE-L, as TOFU and open-unlearning generate


def answer_probability(true_logprob, perturbed_logprobs=None):
    """Per-sample P(a)^(1/|a|), or its share among the options when ``perturbed_logprobs`` ([n, k]) is given."""
    true_prob = np.exp(np.asarray(true_logprob, dtype=np.float64))
    if perturbed_logprobs is None:
        return true_prob
    return true_prob / (true_prob + np.exp(np.asarray(perturbed_logprobs, dtype=np.float64)).sum(-1))


def truth_ratio(paraphrased_logprob, perturbed_logprobs):
    """Per-sample R = exp(mean_j lnP̄(a_j) − lnP̄(ã)) from mean log-probabilities ([n] and [n, k])."""
    return np.exp(np.asarray(perturbed_logprobs, dtype=np.float64).mean(-1)
                  - np.asarray(paraphrased_logprob, dtype=np.float64))


def truth_score(ratios, *, forget: bool) -> float:
    ratios = np.asarray(ratios, dtype=np.float64)
    if forget:
        return float(np.minimum(ratios, 1 / ratios).mean())
    return float(np.maximum(0.0, 1 - ratios).mean())


def forget_quality(unlearned_ratios, retain_model_ratios) -> float:
    """KS-test p-value: high when the unlearned model's forget truth ratios look like the retain-only model's."""
    return float(ks_2samp(np.asarray(unlearned_ratios), np.asarray(retain_model_ratios)).pvalue)


def harmonic_mean(values) -> float:
    """n / Σ 1/x; 0 when any value is 0 (one failed metric sinks utility, as in TOFU)."""
    values = [float(v) for v in values]
    if not values or any(v < 0 or math.isnan(v) for v in values):
        raise ValueError(f"harmonic mean needs non-negative numbers, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def score_set(model, tokenizer, pairs, *, normalized=False, generate=True, memorization=False,
              max_new_tokens=MAX_NEW_TOKENS, batch_size=64) -> dict:
    """Per-sample numbers of one set: ``probability``, ``truth_ratio``, ``rouge_l`` and the generations.

    ``normalized``: the answer probability is the share among the perturbed options (real authors, world facts).
    Truth ratios need ``perturbed_answers`` on every pair; their reference is the paraphrased answer where a pair
    has one and the answer itself where not (TOFU's ``base_answer_key: answer`` on real authors and world facts).
    ``paraphrased_probability`` and ``perturbed_probability`` (mean over the perturbations) come with them.
    ``memorization``: also the membership attacks' scores, exact memorization and extraction strength
    (`likelihood.memorization_scores`).
    """
    if not pairs:
        raise ValueError("cannot score an empty set")
    if generate and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    questions = [p.question for p in pairs]
    k = min(len(p.perturbed_answers) for p in pairs)
    true_lp = mean_answer_logprobs(model, tokenizer, questions, [p.answer for p in pairs], batch_size=batch_size)
    out = {"question": questions, "answer": [p.answer for p in pairs], "answer_logprob": true_lp.tolist()}
    pert_lp = None
    if k > 0:
        if any(p.paraphrased_answer for p in pairs):
            base_lp = mean_answer_logprobs(model, tokenizer, questions,
                                           [p.paraphrased_answer or p.answer for p in pairs],
                                           batch_size=batch_size).numpy()
            out["paraphrased_probability"] = np.exp(base_lp).tolist()
        else:
            base_lp = true_lp.numpy()
        pert_lp = mean_answer_logprobs(model, tokenizer, [q for q in questions for _ in range(k)],
                                       [a for p in pairs for a in p.perturbed_answers[:k]],
                                       batch_size=batch_size).numpy().reshape(len(pairs), k)
        out["truth_ratio"] = truth_ratio(base_lp, pert_lp).tolist()
        out["perturbed_probability"] = np.exp(pert_lp).mean(-1).tolist()
    elif normalized:
        raise ValueError("normalized probabilities need perturbed answers on every pair")
    out["probability"] = answer_probability(true_lp.numpy(), pert_lp if normalized else None).tolist()
    if generate:
        out["generation"] = greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
        out["rouge_l"] = [rouge_l_recall(p.answer, g) for p, g in zip(pairs, out["generation"])]
    if memorization:
        out.update(score_memorization(model, tokenizer, pairs, batch_size=batch_size))
    return out


def score_memorization(model, tokenizer, pairs, *, batch_size=32) -> dict:
    """Membership-attack scores, exact memorization and extraction strength of each pair's answer."""
    return memorization_scores(model, tokenizer, [encode_pair(tokenizer, p.question, p.answer) for p in pairs],
                               batch_size=batch_size)


NO_RETAIN_MODEL = ("no retain model's evaluation was given (geffect train: --retain-model DIR or "
                   "--retain-eval FILE)")
NO_TRUTH_RATIOS = "the forget set has no perturbed answers to compute truth ratios with (TOFU's *_perturbed files do)"
NO_HOLDOUT = "no holdout set was given (geffect train: --holdout FILE)"


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(forget, retain=None, world=None, *, real_authors=None, holdout=None, retain_model_forget_ratios=None,
              retain_model_mia_auc=None, retain_model_missing=None) -> dict:
    """Set-level numbers from `score_set` outputs.

    TOFU: ``<set>_probability``, ``<set>_rouge_l``, ``<set>_truth`` per set; ``model_utility`` (TOFU's nine-number
    harmonic mean) when retain, real authors and world facts all have the three numbers, else the harmonic mean
    over the complete sets given, named after them (``retain_utility``, ...); ``forget_quality`` from the retain
    model's forget truth ratios; ``forget_paraphrased_probability``, ``forget_perturbed_probability``.
    Memorization (where the forget scores have them): ``forget_exact_memorization``,
    ``forget_extraction_strength``; with ``holdout``: ``mia_auc`` (attack -> AUC), and ``privleak`` from the
    retain model's ``mia_auc``. What could not be computed is named in ``missing`` (metric -> why);
    ``retain_model_missing`` (metric -> why) gives the reason where the retain model's numbers are not given.
    """
    summary, missing = {}, {}
    sets = {name: scores for name, scores in (("forget", forget), ("retain", retain),
                                              ("real_authors", real_authors), ("world", world))
            if scores is not None}
    for name, scores in sets.items():
        summary[f"{name}_probability"] = float(np.mean(scores["probability"]))
        if "rouge_l" in scores:
            summary[f"{name}_rouge_l"] = float(np.mean(scores["rouge_l"]))
        if "truth_ratio" in scores:
            summary[f"{name}_truth"] = truth_score(scores["truth_ratio"], forget=name == "forget")
    for key in ("paraphrased_probability", "perturbed_probability"):
        if key in forget:
            summary[f"forget_{key}"] = float(np.mean(forget[key]))
    complete = [s for s in UTILITY_SETS if all(f"{s}_{m}" in summary for m in UTILITY_METRICS)]
    if complete:
        key = "model_utility" if len(complete) == len(UTILITY_SETS) else "_".join(complete) + "_utility"
        summary[key] = harmonic_mean(summary[f"{s}_{m}"] for s in complete for m in UTILITY_METRICS)
    if "truth_ratio" not in forget:
        missing["forget_quality"] = NO_TRUTH_RATIOS
    elif retain_model_forget_ratios is None:
        missing["forget_quality"] = (retain_model_missing or {}).get("forget_quality", NO_RETAIN_MODEL)
    else:
        summary["forget_quality"] = forget_quality(forget["truth_ratio"], retain_model_forget_ratios)
    for key in ("exact_memorization", "extraction_strength"):
        if key in forget:
            summary[f"forget_{key}"] = _mean(forget[key])
    if holdout is None:
        missing["mia_auc"] = missing["privleak"] = NO_HOLDOUT
    else:
        try:
            summary["mia_auc"] = mia_auc(attack_columns(forget), attack_columns(holdout))
        except ValueError as err:  # NaN scores of a diverged model: reported, not fatal after a finished run
            missing["mia_auc"] = missing["privleak"] = str(err)
    if "mia_auc" in summary:
        reference = (retain_model_mia_auc or {}).get(PRIVLEAK_ATTACK)
        if reference is None:
            missing["privleak"] = (retain_model_missing or {}).get("privleak", NO_RETAIN_MODEL)
        else:
            try:
                summary["privleak"] = privleak(summary["mia_auc"][PRIVLEAK_ATTACK], reference)
            except ValueError as err:  # the retain model's own AUC leaves nothing to divide by
                missing["privleak"] = str(err)
    if missing:
        summary["missing"] = missing
    return summary


def evaluate_model(model, tokenizer, forget, retain=None, world=None, *, real_authors=None, holdout=None,
                   retain_model_forget_ratios=None, retain_model_mia_auc=None, retain_model_missing=None, **kwargs):
    """Score the sets given and summarize: ``(summary, {"forget": ..., "retain": ..., ...})``.

    ``real_authors`` and ``world`` are scored with option-normalized probabilities; the forget set also with the
    membership attacks and memorization, and ``holdout`` (pairs the model never saw) with the attacks only;
    ``kwargs`` go to `score_set` (``max_new_tokens``: greedy generation length for ROUGE-L, 200 by default).
    """
    with eval_mode(model):
        per_sample = {"forget": score_set(model, tokenizer, forget, memorization=True, **kwargs)}
        for name, pairs in (("retain", retain), ("real_authors", real_authors), ("world", world)):
            if pairs:
                per_sample[name] = score_set(model, tokenizer, pairs, normalized=name in NORMALIZED_SETS, **kwargs)
        if holdout:
            per_sample["holdout"] = score_memorization(model, tokenizer, holdout,
                                                       **({"batch_size": kwargs["batch_size"]}
                                                          if "batch_size" in kwargs else {}))
    return summarize(**per_sample, retain_model_forget_ratios=retain_model_forget_ratios,
                     retain_model_mia_auc=retain_model_mia_auc, retain_model_missing=retain_model_missing), per_sample
