"""The paper's observations (Wang et al., ICLR 2025), each a test on a run's own numbers that can fail.

Every check returns a `Check`: the claim, whether it holds, and the numbers that decided it. `verdict` turns
the checks of several seeds into one word: an observation holds only when it holds for every seed.

(a) GA's retaining G-effect is negative (GA damages the retain set).
(b) Unlearning G-effects concentrate in the shallow layers: mean |e| per layer over the shallow half of the
    blocks exceeds that over the deep half (the middle block of an odd count belongs to neither).
(c) The same for the retaining G-effects.
(d) NPO's weights shrink as unlearning goes on (it acts like early stopping): the mean NPO weight over the
    forget set falls from the first probe to the last, with a negative rank correlation against the step.
(e) NPO gives the instances that damage retention most the smaller weights: the rank correlation between an
    instance's damage (minus its GA retaining G-effect) and its NPO weight is negative (mean over probes).
(f) The token-weighted objectives reach a given forget level with less retain damage than GA and NPO: at the
    deepest forget probability every objective reaches, each of wga/tnpo/wtnpo keeps a higher retain
    probability than both ga and npo.

Beyond the paper, for each G-effect-guided variant ``OBJECTIVE+GUIDANCE`` (`guidance`) run next to its objective:
(g) guidance reaches the objective's forget level with less retain damage: at the deepest forget probability both
    runs reach, the guided run keeps a higher retain probability (`guidance_damage_less`).

The paper's case study (GA, NPO, PO, RMU, each with the NLL, KL and RR retain terms), its comparisons as this project
states them, on the G-effects summed over a run's recorded steps (the paper's cumulative G-effects):
(h) PO unlearns more weakly than GA: |Σ e_forget| of PO is below GA's (PO raises the likelihood of a substitute
    answer instead of lowering that of the forget answer).
(i) RMU damages retention less than GA: |Σ e_retain| of RMU is below GA's (it moves a few layers' activations on
    the forget data only).
(j) The NLL retain term works against unlearning: its Σ e_forget is positive (lowering the retain NLL lowers the
    forget NLL too) alongside every case-study objective.
(k) The KL and RR retain terms protect retention less than the NLL term: their Σ e_retain is below the NLL term's
    alongside every case-study objective (they are 0 at the starting model and grow as it moves).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

TOKEN_WEIGHTED = ("wga", "tnpo", "wtnpo")
BASELINES = ("ga", "npo")
CLAIMS = {
    "a": "GA's retaining G-effect is negative",
    "b": "unlearning G-effects concentrate in the shallow layers",
    "c": "retaining G-effects concentrate in the shallow layers",
    "d": "NPO's weights shrink as unlearning goes on (early stopping)",
    "e": "NPO gives the instances that damage retention most smaller weights",
    "f": "the token-weighted objectives reach a forget level with less retain damage than GA and NPO",
    "g": "G-effect guidance reaches its objective's forget level with less retain damage",
    "h": "PO unlearns more weakly than GA",
    "i": "RMU damages retention less than GA",
    "j": "the NLL retain term works against unlearning",
    "k": "the KL and RR retain terms protect retention less than the NLL term",
}
CASE_STUDY = ("ga", "npo", "po", "rmu")


@dataclass(frozen=True)
class Check:
    claim: str
    holds: bool | None  # None: the numbers cannot decide (see evidence)
    evidence: str
    nan: bool = False  # undecided because numbers it rests on are NaN or infinite (a diverged run)


def _not_finite(claim: str, what: str, values) -> Check | None:
    """The undecided Check when any of ``values`` is NaN or infinite (every comparison with NaN is false, which
    read as "does not hold"), else None."""
    values = [float(v) for v in values]
    bad = sum(not math.isfinite(v) for v in values)
    if not bad:
        return None
    return Check(claim, None, f"{what} NaN or infinite at {bad} of {len(values)} values: cannot be decided", nan=True)


def _fmt(value) -> str:
    return f"{value:.3g}"


def _rank_correlation(x, y) -> float:
    """Spearman's ρ; NaN when either side is constant (no ranking to compare)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def ga_retaining_negative(e_retain_per_step) -> Check:
    """(a) from GA's retaining G-effect at each recorded step."""
    values = [float(v) for v in e_retain_per_step]
    undecided = _not_finite(CLAIMS["a"], "GA's retaining G-effect is", values)
    if undecided:
        return undecided
    total = sum(values)
    return Check(CLAIMS["a"], total < 0,
                 f"Σ e_retain = {_fmt(total)} over {len(values)} recorded steps, negative at "
                 f"{sum(v < 0 for v in values)} of them")


def shallow_layers_dominate(per_layer, risk: str) -> Check:
    """(b)/(c): ``per_layer[objective]`` lists, per block in model order, its G-effect at each recorded step.

    Holds when, for every objective, mean |e| over the shallow half of the blocks exceeds the deep half's."""
    claim = CLAIMS["b" if risk == "forget" else "c"]
    undecided = _not_finite(claim, f"the {risk} G-effects per block are",
                            [v for layers in per_layer.values() for values in layers for v in np.ravel(values)])
    if undecided:
        return undecided
    parts, holds = [], True
    for name, layers in per_layer.items():
        if len(layers) < 2:
            raise ValueError(f"{name}: need at least two blocks to compare shallow with deep, got {len(layers)}")
        size = [float(np.mean(np.abs(values))) for values in layers]
        half = len(size) // 2
        shallow, deep = float(np.mean(size[:half])), float(np.mean(size[-half:]))
        holds &= shallow > deep
        parts.append(f"{name} {_fmt(shallow)} vs {_fmt(deep)}")
    return Check(claim, holds and bool(parts),
                 "mean |e| per block, shallow half vs deep half: " + ", ".join(parts))


def npo_weights_shrink(steps, mean_weights) -> Check:
    """(d) from the mean NPO weight over the forget set at each probe (step 0: the reference, weight 1)."""
    if len(steps) != len(mean_weights) or len(steps) < 2:
        raise ValueError("need the mean NPO weight at two probes or more, one per step")
    undecided = _not_finite(CLAIMS["d"], "the mean NPO weight is", mean_weights)
    if undecided:
        return undecided
    rho = _rank_correlation(steps, mean_weights)
    holds = mean_weights[-1] < mean_weights[0] and rho < 0
    return Check(CLAIMS["d"], bool(holds),
                 f"mean NPO weight {_fmt(mean_weights[0])} at step {steps[0]} → {_fmt(mean_weights[-1])} at step "
                 f"{steps[-1]}, rank correlation with the step {_fmt(rho)}")


def npo_spares_damaging_instances(probes) -> Check:
    """(e) from ``[(weights, damage), ...]``, one pair of per-instance lists per probe; damage = minus the
    instance's GA retaining G-effect (larger: its gradient raises the retain NLL more). Probes where every
    weight is equal (the reference itself) rank nothing and are skipped."""
    undecided = _not_finite(CLAIMS["e"], "the NPO weights or instance damages are",
                            [v for w, d in probes for v in (*np.ravel(w), *np.ravel(d))])
    if undecided:
        return undecided
    rhos = [r for r in (_rank_correlation(d, w) for w, d in probes) if not math.isnan(r)]
    if not rhos:
        raise ValueError("no probe where the NPO weights differ between instances")
    mean = float(np.mean(rhos))
    return Check(CLAIMS["e"], mean < 0,
                 f"rank correlation of instance damage with NPO weight {_fmt(mean)} (mean over {len(rhos)} probes, "
                 f"negative at {sum(r < 0 for r in rhos)})")


def retain_at_forget_level(trajectories, level):
    """Per objective, the retain probability where its forget probability first falls to ``level``
    (linear interpolation between probes); None when it never gets there."""
    out = {}
    for name in dict.fromkeys(t["objective"] for t in trajectories):
        points = [(t["probe_forget_probability"], t["probe_retain_probability"])
                  for t in trajectories if t["objective"] == name]
        out[name] = None
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if f0 >= level >= f1:
                out[name] = r0 if f0 == f1 else r0 + (r1 - r0) * (f0 - level) / (f0 - f1)
                break
    return out


def token_weighted_damage_less(trajectories) -> Check:
    """(f) from one seed's probes (``objective``, ``step``, ``probe_forget_probability``,
    ``probe_retain_probability``; step 0 is the target model, shared by every objective)."""
    trajectories = [t for t in trajectories if t["objective"] in TOKEN_WEIGHTED + BASELINES]  # not guided variants
    names = list(dict.fromkeys(t["objective"] for t in trajectories))
    missing = [n for n in TOKEN_WEIGHTED + BASELINES if n not in names]
    if missing:
        raise ValueError(f"observation (f) needs runs of {', '.join(missing)}")
    undecided = _not_finite(CLAIMS["f"], "the probes' forget or retain probabilities are", _probabilities(trajectories))
    if undecided:
        return undecided
    start = max(t["probe_forget_probability"] for t in trajectories if t["step"] == 0)
    level = max(min(t["probe_forget_probability"] for t in trajectories if t["objective"] == n) for n in names)
    at = retain_at_forget_level(trajectories, level)
    table = ", ".join(f"{n} {_fmt(at[n])}" for n in names if at[n] is not None)
    worst_baseline = max(at[n] for n in BASELINES)
    failing = [n for n in TOKEN_WEIGHTED if not at[n] > worst_baseline]
    holds = level < start and not failing
    evidence = (f"at forget probability {_fmt(level)} (from {_fmt(start)}) the retain probability is {table}"
                + (f"; not better than both baselines: {', '.join(failing)}" if failing else ""))
    return Check(CLAIMS["f"], bool(holds), evidence)


def guidance_damage_less(trajectories, variant: str) -> Check:
    """(g) for ``variant`` (``"ga+rectify"``) against its objective (``"ga"``), from one seed's probes (as for (f))."""
    base = variant.split("+", 1)[0]
    runs = [t for t in trajectories if t["objective"] in (base, variant)]
    names = set(t["objective"] for t in runs)
    if names != {base, variant}:
        raise ValueError(f"observation (g) needs runs of {base} and {variant}")
    undecided = _not_finite(f"{variant}: {CLAIMS['g']}", "the probes' forget or retain probabilities are",
                            _probabilities(runs))
    if undecided:
        return undecided
    start = max(t["probe_forget_probability"] for t in runs if t["step"] == 0)
    level = max(min(t["probe_forget_probability"] for t in runs if t["objective"] == n) for n in (base, variant))
    at = retain_at_forget_level(runs, level)
    holds = level < start and at[variant] > at[base]
    return Check(f"{variant}: {CLAIMS['g']}", bool(holds),
                 f"at forget probability {_fmt(level)} (from {_fmt(start)}) the retain probability is {variant} "
                 f"{_fmt(at[variant])}, {base} {_fmt(at[base])}")


def _weaker(letter, objective, risk, sums) -> Check:
    """(h)/(i): |Σ e_risk| of ``objective`` below GA's; ``sums`` {objective: {risk: Σ e}}."""
    claim = CLAIMS[letter]
    if objective not in sums or "ga" not in sums:
        raise ValueError(f"observation ({letter}) needs runs of {objective} and ga")
    mine, ga = sums[objective][risk], sums["ga"][risk]
    undecided = _not_finite(claim, f"the Σ e_{risk} are", [mine, ga])
    if undecided:
        return undecided
    return Check(claim, abs(mine) < abs(ga), f"Σ e_{risk}: {objective} {_fmt(mine)}, ga {_fmt(ga)}")


def po_unlearns_weaker(sums) -> Check:
    """(h) from the objectives' summed G-effects {objective: {"forget": Σ e, "retain": Σ e}}."""
    return _weaker("h", "po", "forget", sums)


def rmu_retains_better(sums) -> Check:
    """(i), as (h)."""
    return _weaker("i", "rmu", "retain", sums)


def nll_term_against_unlearning(term_sums) -> Check:
    """(j) from the retain terms' summed G-effects {objective: {term: {risk: Σ e}}}."""
    claim = CLAIMS["j"]
    values = {o: t["nll"]["forget"] for o, t in term_sums.items() if "nll" in t}
    if not values:
        raise ValueError("observation (j) needs the NLL retain term's G-effects")
    undecided = _not_finite(claim, "the NLL term's Σ e_forget are", list(values.values()))
    if undecided:
        return undecided
    return Check(claim, all(v > 0 for v in values.values()),
                 "Σ e_forget of the NLL term beside " + ", ".join(f"{o} {_fmt(v)}" for o, v in values.items()))


def kl_rr_protect_less(term_sums) -> Check:
    """(k), from what (j) reads."""
    claim = CLAIMS["k"]
    rows = {o: t for o, t in term_sums.items() if all(k in t for k in ("nll", "kl", "rr"))}
    if not rows:
        raise ValueError("observation (k) needs the NLL, KL and RR retain terms' G-effects")
    undecided = _not_finite(claim, "the terms' Σ e_retain are",
                            [t[k]["retain"] for t in rows.values() for k in ("nll", "kl", "rr")])
    if undecided:
        return undecided
    holds = all(t["kl"]["retain"] < t["nll"]["retain"] and t["rr"]["retain"] < t["nll"]["retain"]
                for t in rows.values())
    return Check(claim, holds, "Σ e_retain nll / kl / rr: " + ", ".join(
        f"{o} {_fmt(t['nll']['retain'])} / {_fmt(t['kl']['retain'])} / {_fmt(t['rr']['retain'])}"
        for o, t in rows.items()))


def _probabilities(trajectories) -> list:
    return [t[key] for t in trajectories for key in ("probe_forget_probability", "probe_retain_probability")]


def verdict(checks) -> str:
    """"holds" when every seed's check holds, "does not hold" when none does, else "depends on the seed"; not
    decided when a check is not, saying so when NaN or infinite numbers are why."""
    if any(c.nan for c in checks):
        return "cannot be decided: NaN or infinite numbers"
    if any(c.holds is None for c in checks):
        return "not decided by these numbers"
    held = sum(c.holds for c in checks)
    if held == len(checks):
        return "holds"
    if held == 0:
        return "does not hold"
    return f"depends on the seed (holds for {held} of {len(checks)})"
