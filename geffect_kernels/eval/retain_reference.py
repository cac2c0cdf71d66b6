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

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .membership import attack_columns, mia_auc
from .muse import privleak_auc
from ..structured_files import read_json

RETAIN_NAMES = ("retain_only", "retain_model", "retain")  # what a file of several models calls the retain model


@dataclass(frozen=True)
class RetainReference:
    source: str
    forget_truth_ratios: list | None = None
    mia_auc: dict | None = None
    missing: dict = field(default_factory=dict)  # metric -> why it cannot be computed against this reference
    muse_mia_auc: dict | None = None  # on MUSE's privleak forget and holdout texts

    def truncated(self, size: int | None) -> RetainReference:
        """The reference on the first ``size`` forget items, as the evaluation scores them."""
        if size is None or self.forget_truth_ratios is None:
            return self
        return replace(self, forget_truth_ratios=self.forget_truth_ratios[:size])

    def as_kwargs(self) -> dict:
        return {"retain_model_forget_ratios": self.forget_truth_ratios, "retain_model_mia_auc": self.mia_auc,
                "retain_model_missing": self.missing}


def from_per_sample(per_sample: dict, source: str) -> RetainReference:
    """The reference from this project's per-sample evaluation of the retain model."""
    forget, holdout = per_sample.get("forget") or {}, per_sample.get("holdout")
    missing = {}
    ratios = forget.get("truth_ratio")
    if ratios is None:
        missing["forget_quality"] = f"{source} has no forget truth ratios (the forget set had no perturbed answers)"
    auc = None
    scores = attack_columns(forget)
    if holdout and scores:
        auc = mia_auc(scores, attack_columns(holdout))
    else:
        missing["privleak"] = f"{source} has no membership scores on a forget and a holdout set"
    muse = per_sample.get("muse_privleak")
    return RetainReference(source, None if ratios is None else [float(r) for r in ratios], auc, missing,
                           privleak_auc(muse) if muse else None)


def _tofu_ratios(log: dict, path) -> list:
    def ordered(values):
        keys = list(values)
        if all(str(k).isdigit() for k in keys):
            keys.sort(key=int)
        return [values[k] for k in keys]

    para = np.asarray(ordered(log["avg_paraphrased_loss"]), dtype=np.float64)
    perturbed = ordered(log["average_perturb_loss"])
    try:
        pert = np.asarray([np.mean(v) for v in perturbed], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: average_perturb_loss must map each index to a list of losses") from None
    if para.shape != pert.shape:
        raise ValueError(f"{path}: {para.size} paraphrased but {pert.size} perturbed losses")
    # TOFU's statistic is exp(perturbed − paraphrased loss) = P(ã)/P(a_j); ours is its inverse (R = P(a_j)/P(ã))
    return np.exp(para - pert).tolist()


def read_retain_reference(path) -> RetainReference:
    """The reference from a saved evaluation (see the module docstring); ValueError naming the file otherwise."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a per-sample evaluation or TOFU's eval log)")
    if isinstance(data.get("eval_log_forget.json"), dict):
        data = data["eval_log_forget.json"]
    if "avg_paraphrased_loss" in data and "average_perturb_loss" in data:
        return RetainReference(f"{path} (TOFU eval log)", _tofu_ratios(data, path), None,
                               {"privleak": f"{path} is a TOFU eval log, which has no membership scores"})
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
