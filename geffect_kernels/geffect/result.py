"""G-effect values: one measurement (`GEffectResult`) and a run's worth of them (`GEffectHistory`).

Sign convention (DESIGN §1): a G-effect is e = ∇objectiveᵀ∇risk with risk = the NLL. One SGD step of size
η on the objective changes the risk by ≈ −η·e, so a negative unlearning G-effect (risk "forget") means the
forget NLL rises (forgetting), and a negative retaining G-effect (risk "retain") means the retain NLL rises
(damage). A good unlearning objective has e_forget strongly negative and e_retain ≥ 0.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from ..structured_files import UnreadableFile, read_json


@dataclass
class GEffectResult:
    """``total[risk]``; ``by_group[group][risk]`` (summing to the total); ``per_instance[risk]`` (one value
    per objective sample, summing to the total) when asked for; ``losses``: the objective's and the risks'
    values at the measured parameters; ``retain_term``: the same for the training step's retain term."""
    total: dict[str, float]
    by_group: dict[str, dict[str, float]]
    per_instance: dict[str, list[float]] | None = None
    losses: dict[str, float] = field(default_factory=dict)
    retain_term: GEffectResult | None = None  # the G-effects of an nll retain term (`measure_unlearning`)
    plan: list | None = None  # `products.PlanEntry` per parameter (and the head pass): the form and its cost

    def explain(self) -> str:
        """The plan as a table: each parameter's form (gram, projection, sparse, direct, dense), the
        estimated flops of the form used and of the alternative, and the totals per form. The head pass's
        projection figure also counts the memory traffic of the V×H gradients it holds, as
        `head.HELD_ELEMENT_FLOPS` flops per element."""
        if not self.plan:
            return "no plan recorded"
        lines = [f"{'parameter':48s} {'group':16s} {'form':10s} {'GFLOP':>9s}  alternatives (GFLOP)"]
        by_form = {}
        for e in self.plan:
            others = ", ".join(f"{form} {flops / 1e9:.3g}" for form, flops in e.costs.items() if form != e.form)
            lines.append(f"{e.parameter:48s} {e.group:16s} {e.form:10s} {e.flops / 1e9:9.3g}  {others}")
            by_form[e.form] = by_form.get(e.form, 0.0) + e.flops
        lines.append("total: " + ", ".join(f"{form} {flops / 1e9:.3g} GFLOP" for form, flops in by_form.items()))
        return "\n".join(lines)

    @property
    def risks(self) -> list[str]:
        return list(self.total)

    def to_dict(self) -> dict:
        return {"total": self.total, "by_group": self.by_group, "per_instance": self.per_instance,
                "losses": self.losses, "retain_term": self.retain_term and self.retain_term.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> GEffectResult:
        """The inverse of `to_dict`; ValueError when a value that must be a number is not one."""
        term = data.get("retain_term")
        total, by_group = _numbers(data["total"], "total"), data["by_group"]
        by_group = {group: _numbers(risks, f"by_group.{group}") for group, risks in by_group.items()}
        per_instance = data.get("per_instance")
        if per_instance is not None:
            per_instance = {risk: list(_numbers(dict(enumerate(values)), f"per_instance.{risk}").values())
                            for risk, values in per_instance.items()}
        return cls(total, by_group, per_instance, _numbers(data.get("losses", {}), "losses"),
                   term and cls.from_dict(term))


class GEffectHistory:
    """Results recorded during training (e.g. every k steps), with running sums over the recorded steps.

    The cumulative value at a step is the sum of the values recorded up to it; when recording every k
    steps, multiply by k to estimate the sum over all steps.
    """

    def __init__(self, objective: str | None = None):
        self.objective = objective
        self.steps: list[int] = []
        self.results: list[GEffectResult] = []

    def record(self, step: int, result: GEffectResult) -> None:
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase: got {step} after {self.steps[-1]}")
        self.steps.append(int(step))
        self.results.append(result)

    def __len__(self):
        return len(self.steps)

    @property
    def risks(self) -> list[str]:
        return list(dict.fromkeys(r for res in self.results for r in res.total))

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(g for res in self.results for g in res.by_group))

    def per_step(self, risk: str, group: str | None = None) -> list[float]:
        """Value at each recorded step: the total, or one group's (0 where the group was absent)."""
        if group is None:
            return [res.total.get(risk, float("nan")) for res in self.results]
        return [res.by_group.get(group, {}).get(risk, 0.0) for res in self.results]

    def cumulative(self, risk: str, group: str | None = None) -> list[float]:
        out, running = [], 0.0
        for value in self.per_step(risk, group):
            running += value
            out.append(running)
        return out

    def rows(self) -> list[dict]:
        """Long table: one row per (step, group, risk), the group ``total`` first at each step."""
        rows = []
        for risk in self.risks:
            for group in [None, *self.groups]:
                cumulative = self.cumulative(risk, group)
                for i, (step, value) in enumerate(zip(self.steps, self.per_step(risk, group))):
                    rows.append({"step": step, "group": "total" if group is None else group, "risk": risk,
                                 "value": value, "cumulative": cumulative[i]})
        rows.sort(key=lambda r: r["step"])  # stable: groups keep their order within a step
        return rows

    def to_csv(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "group", "risk", "value", "cumulative"])
            writer.writeheader()
            writer.writerows(self.rows())
        return path

    def to_dict(self) -> dict:
        """Plain data (JSON types only): what `to_json` writes and a training checkpoint carries."""
        return {"objective": self.objective,
                "records": [{"step": s, **r.to_dict()} for s, r in zip(self.steps, self.results)]}

    @classmethod
    def from_dict(cls, data: dict) -> GEffectHistory:
        history = cls(data.get("objective"))
        for record in data["records"]:
            history.record(record["step"], GEffectResult.from_dict(record))
        return history

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path) -> GEffectHistory:
        try:
            return cls.from_dict(read_json(path))
        except UnreadableFile as err:
            raise ValueError(f"{path}: not a G-effect history ({err.reason})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # not a history
            raise ValueError(f"{path}: not a G-effect history ({type(err).__name__}: {err})") from None

    def plot(self, out_dir, *, prefix: str | None = None) -> list[Path]:
        """PNG figures in ``out_dir``: a group × step heatmap per risk and the cumulative curves."""
        from .plot import plot_history
        return plot_history(self, out_dir, prefix=prefix)


def _numbers(values: dict, what: str) -> dict:
    """``values`` (``{key: number}``) when every value is a number; ValueError naming the first that is not."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what}.{key} must be a number, got {str(value)[:60]!r}")
    return values
