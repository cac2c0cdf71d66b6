"""The retain model's numbers that forget quality and privleak are relative to: its truth ratios on the forget set
and its membership-inference AUC (forget against holdout), from a model evaluated here or from a saved evaluation.

Saved evaluations read:

- this project's per-sample evaluation of one model (``{"forget": {"truth_ratio": [...], "mia_loss": [...], ...},
  "holdout": {...}}``, what ``geffect train --eval --retain-model`` writes to ``results/retain_model_eval.json``),
  or a file of several (``{name: per-sample}``, the demo's ``results/per_sample.json``: its ``retain_only``);
  with ``muse_privleak`` (scores on MUSE's privleak texts) where the evaluation had ``--muse``;
- TOFU's ``eval_log_forget.json`` (``avg_paraphrased_loss`` and ``average_perturb_loss`` per index; truth ratio
  exp(paraphrased loss − mean perturbed loss), as ``aggregate_eval_stat.get_forget_quality`` computes it), or an
  ``eval_log_aggregated.json`` holding it under that name. TOFU's logs carry no membership scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .membership import attack_columns, mia_auc
from .muse import privleak_auc
from .run_files import is_number
from ..structured_files import read_json

RETAIN_NAMES = ("retain_only", "retain_model", "retain")  # what a file of several models calls the retain model


@dataclass(frozen=True)
class RetainReference:
    source: str
    forget_truth_ratios: list | None = None
    mia_auc: dict | None = None
    missing: dict = field(default_factory=dict)  # metric -> why it cannot be computed against this reference
    muse_mia_auc: dict | None = None  # on MUSE's privleak forget and holdout texts
    forget_indices: list | None = None  # the forget items the ratios are of (a TOFU log's keys); else 0, 1, ...

    def for_forget_set(self, count: int, size: int | None = None) -> RetainReference:
        """The reference on the forget items the evaluation scores: the first ``size`` (all when None) of a forget
        set of ``count``. ValueError when its truth ratios are of other items (another number of them, other
        indices); a ``missing`` reason in place of the ratios when there are none or some are NaN or infinite."""
        ratios = self.forget_truth_ratios
        if ratios is None:
            return self
        if not ratios:
            return self._without_ratios(f"{self.source} holds no forget truth ratios (an empty evaluation)")
        indices = list(range(len(ratios))) if self.forget_indices is None else self.forget_indices
        evaluated = count if size is None else min(size, count)
        if len(ratios) not in (count, evaluated) or indices != list(range(len(ratios))):
            raise ValueError(f"{self.source}: the retain model's truth ratios are of {_items(indices)}, the forget "
                             f"set has {count} (0–{count - 1}"
                             f"{f', the first {evaluated} evaluated' if evaluated < count else ''}): the items do "
                             f"not match; evaluate the retain model on this forget set (--retain-model)")
        kept = ratios[:evaluated]
        bad = [i for i, r in enumerate(kept) if not math.isfinite(r)]
        if bad:
            return self._without_ratios(f"{self.source}: the retain model's truth ratio is NaN or infinite on "
                                        f"{len(bad)} forget item(s) (the first: {bad[0]})")
        return replace(self, forget_truth_ratios=kept, forget_indices=None)

    def _without_ratios(self, reason: str) -> RetainReference:
        return replace(self, forget_truth_ratios=None, forget_indices=None,
                       missing={**self.missing, "forget_quality": reason})

    def as_kwargs(self) -> dict:
        return {"retain_model_forget_ratios": self.forget_truth_ratios, "retain_model_mia_auc": self.mia_auc,
                "retain_model_missing": self.missing}


def _items(indices) -> str:
    if indices == list(range(len(indices))):
        return f"{len(indices)} items (0–{len(indices) - 1})"
    return f"{len(indices)} items ({', '.join(map(str, indices[:5]))}{', ...' if len(indices) > 5 else ''})"


def _numbers(values, what: str, source) -> list[float]:
    """``values`` as floats when it is a list of numbers (NaN and infinity allowed: they become ``missing``)."""
    if not isinstance(values, list) or not all(is_number(v) for v in values):
        raise ValueError(f"{source}: {what} must be a list of numbers, got {str(values)[:60]!r}")
    return [float(v) for v in values]


def from_per_sample(per_sample: dict, source: str) -> RetainReference:
    """The reference from this project's per-sample evaluation of the retain model; ValueError naming ``source``
    when its parts are not the lists of numbers such an evaluation holds."""
    forget, holdout = per_sample.get("forget") or {}, per_sample.get("holdout")
    for name, part in (("forget", forget), ("holdout", holdout)):
        if part is not None and not isinstance(part, dict):
            raise ValueError(f"{source}: {name} must map metrics to per-sample lists, got {str(part)[:60]!r}")
    missing = {}
    ratios = forget.get("truth_ratio")
    if ratios is None:
        missing["forget_quality"] = f"{source} has no forget truth ratios (the forget set had no perturbed answers)"
    else:
        ratios = _numbers(ratios, "forget.truth_ratio", source)
    auc = None
    scores = {name: _numbers(v, f"forget.mia_{name}", source) for name, v in attack_columns(forget).items()}
    if holdout and scores:
        held = {name: _numbers(v, f"holdout.mia_{name}", source) for name, v in attack_columns(holdout).items()}
        try:
            auc = mia_auc(scores, held)
        except ValueError as err:  # NaN scores: no privleak against this reference, said why
            missing["privleak"] = f"{source}: {err}"
    else:
        missing["privleak"] = f"{source} has no membership scores on a forget and a holdout set"
    muse = per_sample.get("muse_privleak")
    try:
        muse_auc = privleak_auc(muse) if muse else None
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{source}: muse_privleak is not the scores of a MUSE privleak evaluation "
                         f"({type(err).__name__}: {err})") from None
    return RetainReference(source, ratios, auc, missing, muse_auc)


def _tofu_ratios(log: dict, path) -> tuple[list, list]:
    """(truth ratios, the forget indices they are of) from TOFU's eval log."""
    para, pert = log["avg_paraphrased_loss"], log["average_perturb_loss"]
    for name, values in (("avg_paraphrased_loss", para), ("average_perturb_loss", pert)):
        if not isinstance(values, dict) or not all(str(k).isdigit() for k in values):
            raise ValueError(f"{path}: {name} must map each forget index (0, 1, ...) to losses, got "
                             f"{str(values)[:60]!r}")
    if set(para) != set(pert):
        raise ValueError(f"{path}: avg_paraphrased_loss and average_perturb_loss are of different forget indices")
    keys = sorted(para, key=int)
    if not all(is_number(para[k]) for k in keys):
        raise ValueError(f"{path}: avg_paraphrased_loss must map each index to a loss (a number)")
    if not all(isinstance(pert[k], list) and pert[k] and all(is_number(v) for v in pert[k]) for k in keys):
        raise ValueError(f"{path}: average_perturb_loss must map each index to a list of losses")
    paraphrased = np.asarray([para[k] for k in keys], dtype=np.float64)
    perturbed = np.asarray([np.mean(pert[k]) for k in keys], dtype=np.float64)
    # TOFU's statistic is exp(perturbed − paraphrased loss) = P(ã)/P(a_j); ours is its inverse (R = P(a_j)/P(ã))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(paraphrased - perturbed).tolist(), [int(k) for k in keys]


def read_retain_reference(path) -> RetainReference:
    """The reference from a saved evaluation (see the module docstring); ValueError naming the file otherwise."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a per-sample evaluation or TOFU's eval log)")
    if isinstance(data.get("eval_log_forget.json"), dict):
        data = data["eval_log_forget.json"]
    if "avg_paraphrased_loss" in data and "average_perturb_loss" in data:
        ratios, indices = _tofu_ratios(data, path)
        return RetainReference(f"{path} (TOFU eval log)", ratios, None,
                               {"privleak": f"{path} is a TOFU eval log, which has no membership scores"},
                               forget_indices=indices)
    if isinstance(data.get("forget"), dict):
        return from_per_sample(data, str(path))
    models = {name: value for name, value in data.items() if isinstance(value, dict) and "forget" in value}
    chosen = next((name for name in RETAIN_NAMES if name in models), None)
    if chosen is None and len(models) == 1:
        chosen = next(iter(models))
    if chosen is None:
        found = ", ".join(models) or "none"
        raise ValueError(f"{path}: not a per-sample evaluation nor TOFU's eval_log_forget.json "
                         f"(models with a forget set: {found}; the retain model is looked for as "
                         f"{', '.join(RETAIN_NAMES)})")
    return from_per_sample(models[chosen], f"{path} ({chosen})")


__all__ = ["RetainReference", "from_per_sample", "read_retain_reference"]
