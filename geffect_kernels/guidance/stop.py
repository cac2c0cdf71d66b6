"""Stop rules on the online G-effects (``--stop-when``): end unlearning before it over-unlearns.

A rule is ``QUANTITY<NUMBER`` or ``QUANTITY>NUMBER``; several, separated by commas, stop the run when any
holds. The quantities are read off the G-effect history after each recorded step (so the run needs
``geffect_every`` > 0), e_forget and e_retain being the objective's unlearning and retaining G-effects:

- ``retain_ratio``: Σ e_retain / |Σ e_forget|, the running sums over the recorded steps. Negative when the
  retain NLL has been pushed up; ``retain_ratio<-0.5`` stops once the accumulated retain damage exceeds half the
  accumulated forgetting.
- ``forget_fraction``: e_forget now / e_forget at the first recorded step. Starts at 1 and falls as the
  objective stops moving the forget NLL (NPO's weights shrink, GA saturates); ``forget_fraction<0.2`` stops once
  the unlearning G-effect has fallen to a fifth of its start.
- ``step``: the step number (a plain step budget, e.g. with another rule).

The check runs on the G-effects at the parameters a step starts from, before that step's update, so a rule
that fires at step n leaves the model after n − 1 updates.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

QUANTITIES = ("retain_ratio", "forget_fraction", "step")
_RULE = re.compile(r"\s*([a-z_]+)\s*([<>])\s*([-+0-9.eE]+|[-+]?inf)\s*")


@dataclass(frozen=True)
class StopRule:
    quantity: str
    below: bool  # "<": fires when the quantity falls below the threshold; ">": above it
    threshold: float

    def __str__(self):
        return f"{self.quantity}{'<' if self.below else '>'}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return not math.isnan(value) and (value < self.threshold if self.below else value > self.threshold)


def parse_stop_when(text: str | None) -> tuple[StopRule, ...]:
    """The rules of a ``--stop-when`` string ("" or None: none); ValueError naming the part it cannot read."""
    if text is None or not str(text).strip():
        return ()
    rules = []
    for part in str(text).split(","):
        match = _RULE.fullmatch(part)
        if not match:
            raise ValueError(f"--stop-when: cannot read {part.strip()!r}; write QUANTITY<NUMBER or QUANTITY>NUMBER "
                             f"with QUANTITY one of {', '.join(QUANTITIES)}, rules separated by commas")
        quantity, sign, number = match.groups()
        if quantity not in QUANTITIES:
            raise ValueError(f"--stop-when: unknown quantity {quantity!r}; valid: {', '.join(QUANTITIES)}")
        try:
            threshold = float(number)
        except ValueError:
            raise ValueError(f"--stop-when: {number!r} in {part.strip()!r} is not a number") from None
        if math.isnan(threshold):
            raise ValueError(f"--stop-when: the threshold in {part.strip()!r} is not a number")
        rules.append(StopRule(quantity, sign == "<", threshold))
    return tuple(rules)


def quantities(history, step: int) -> dict[str, float]:
    """The rules' quantities from a `GEffectHistory` (NaN where not yet defined: no record, or a zero
    denominator)."""
    forget = history.per_step("forget") if len(history) else []
    retain = history.per_step("retain") if len(history) and "retain" in history.risks else []
    total_forget, total_retain = sum(forget), sum(retain)
    return {
        "retain_ratio": total_retain / abs(total_forget) if retain and total_forget != 0 else math.nan,
        "forget_fraction": forget[-1] / forget[0] if forget and forget[0] != 0 else math.nan,
        "step": float(step),
    }


def fired(rules, history, step: int) -> str | None:
    """The first rule that holds at ``step`` (with its value, e.g. ``"retain_ratio<-0.5 (-0.61)"``), or None."""
    if not rules:
        return None
    values = quantities(history, step)
    for rule in rules:
        if rule.holds(values[rule.quantity]):
            return f"{rule} ({values[rule.quantity]:.4g})"
    return None
