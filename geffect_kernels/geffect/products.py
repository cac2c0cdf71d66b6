"""The inner products of one measurement, parameter by parameter, each in the form its cost model picks.

For a linear layer's weight (DESIGN §4) the Gram form costs 2·n_a·n_b·(p+q) flops per pair of gradients
and the projection form 2·n·p·q per gradient (each gradient materialized once per parameter, then every
pair is a dot product of p×q matrices); the cheaper is taken (`choose`), per parameter, from the shapes at
hand. Per-instance values come from either: the Gram form's rows, or the objective's gradient
materialized per sample, which is used only while it fits in `SAMPLE_ELEMENTS` (past it the Gram form is
forced for that parameter). Embeddings take their sparse rows, vectors (norms, biases) their sums, a
parameter used outside the hooked layers its dense gradient; the LM head of `measure_unlearning` takes the
form its head pass was run in (`head.head_costs`). Everything a parameter needs is computed once for all
pairs and dropped before the next parameter, so at most one parameter's materialized gradients live.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .inner import Factored, Gathered, HeadRows, SampleGrads, SampleScaled, Summed, dense_dot, row_dots, sample_dense

# Largest per-sample materialized gradient (elements) of one parameter: B × p × q.
SAMPLE_ELEMENTS = 1 << 28


@dataclass
class PlanEntry:
    """How one parameter's (or the head pass's) inner products are computed, and the estimated flops."""
    parameter: str
    group: str
    form: str
    flops: float
    costs: dict = field(default_factory=dict)  # every form considered -> estimated flops

    def to_dict(self):
        return {"parameter": self.parameter, "group": self.group, "form": self.form, "flops": self.flops,
                "costs": self.costs}


def choose(costs: dict) -> str:
    """The cheapest form (the one seam where tests force a form)."""
    return min(costs, key=costs.get)


def _base(use):
    return use.base if isinstance(use, SampleScaled) else use


def _pair_gram_flops(a, b):
    a, b = _base(a), _base(b)
    if isinstance(a, Factored) and isinstance(b, Factored):
        return 2 * a.n_rows * b.n_rows * (a.left.shape[1] + a.right.shape[1])
    width = (a.rows if isinstance(a, Gathered) else b.rows).shape[1]
    return 2 * (a.n_rows + b.n_rows) * width


def _materialize_flops(use, numel):
    use = _base(use)
    if isinstance(use, Factored):
        return 2 * use.n_rows * use.left.shape[1] * use.right.shape[1]
    return use.rows.numel() + numel  # Gathered: scatter the rows into a zeroed buffer


def _costs(parts: dict, pairs, numel: int, per_sample: dict) -> dict:
    """Gram and projection flops of a parameter whose uses are Factored (and Gathered, tied embeddings)."""
    gram = sum(_pair_gram_flops(ua, ub) for a, b in pairs for ua in parts[a] for ub in parts[b])
    bases = {id(_base(u)): u for key in parts for u in parts[key]}
    projection = sum(_materialize_flops(u, numel) for u in bases.values())
    projection += sum(2 * numel * per_sample.get(a, 1) for a, _ in pairs)
    if any(n * numel > SAMPLE_ELEMENTS for n in per_sample.values()):
        projection = float("inf")  # per-instance values would need per-sample buffers past the limit
    return {"gram": gram, "projection": projection}


def plan_parameter(name, group, parts: dict, pairs, numel, per_sample: dict, head_entry=None) -> PlanEntry:
    """The form for one parameter, given its ``parts`` ({gradient key: [uses or dense tensors]})."""
    uses = [_base(u) for key in parts for u in parts[key]]
    if any(isinstance(u, torch.Tensor) for u in uses):
        return PlanEntry(name, group, "dense", 0.0)
    if any(isinstance(u, (HeadRows, SampleGrads)) for u in uses):  # the LM head: the form of its pass
        if head_entry is not None:
            return PlanEntry(name, group, head_entry.form, head_entry.flops, dict(head_entry.costs))
        return PlanEntry(name, group, "projection" if any(isinstance(u, SampleGrads) for u in uses) else "gram", 0.0)
    if all(isinstance(u, Summed) for u in uses):
        return PlanEntry(name, group, "direct", float(sum(2 * numel * len(parts[b]) for _, b in pairs)))
    if all(isinstance(u, Gathered) for u in uses):
        return PlanEntry(name, group, "sparse", float(sum(_pair_gram_flops(ua, ub) for a, b in pairs
                                                          for ua in parts[a] for ub in parts[b])))
    costs = _costs(parts, pairs, numel, per_sample)
    form = choose(costs)
    return PlanEntry(name, group, form, costs[form], costs)


class _Materialized:
    """One parameter's dense gradients, each use materialized once (per sample where that is held)."""

    def __init__(self, shape):
        self.shape, self.memo = shape, {}
        self.fits = lambda n: n * _numel(shape) <= SAMPLE_ELEMENTS

    def use(self, use, n_samples) -> torch.Tensor:
        """The use's gradient ``[n_samples, numel]``; a use already held per sample is summed, not redone."""
        key = (id(use), n_samples)
        if key not in self.memo:
            held = [v for k, v in self.memo.items() if k[0] == id(use)]
            if n_samples == 1 and held:
                self.memo[key] = held[0].sum(0, keepdim=True)
            elif isinstance(use, SampleScaled):
                self.memo[key] = sample_dense(use.explicit(), n_samples, self.shape).reshape(n_samples, -1)
            else:
                self.memo[key] = sample_dense(use, n_samples, self.shape).reshape(n_samples, -1)
        return self.memo[key]

    def _scaled(self, use):
        """(base held per sample [k, numel], scale [k]) of a per-sample multiple that fits, else None."""
        if isinstance(use, SampleScaled) and self.fits(use.scale.shape[0]):
            base = self.use(use.base, use.scale.shape[0])  # shared with the gradient it scales
            return base, use.scale.to(base.dtype)
        return None

    def whole(self, parts) -> torch.Tensor:
        """The gradient ``[numel]``."""
        total = 0
        for use in parts:
            scaled = self._scaled(use)
            total = total + (scaled[1] @ scaled[0] if scaled is not None else self.use(use, 1)[0])
        return total

    def sample_dots(self, parts, n_samples, other) -> torch.Tensor:
        """⟨gradient of sample s, ``other``⟩ for each of ``n_samples`` samples (1: the whole), float64."""
        rows = torch.zeros(n_samples, dtype=torch.float64, device=other.device)
        for use in parts:
            scaled = self._scaled(use)
            if scaled is not None:  # λ_s ⟨base_s, other⟩: no scaled copy of the base
                dots = (scaled[0] @ other) * scaled[1]
                rows += (dots if n_samples == dots.shape[0] else dots.sum(0, keepdim=True)).double()
            else:
                rows += (self.use(use, n_samples) @ other).double()
        return rows


def _projection(parts, pairs, shape, per_sample):
    mat, wholes, out = _Materialized(shape), {}, {}
    for a, b in pairs:
        if not parts[a] or not parts[b]:
            out[(a, b)] = (0.0, None)
            continue
        if b not in wholes:
            wholes[b] = mat.whole(parts[b])
        rows = mat.sample_dots(parts[a], per_sample.get(a, 1), wholes[b])
        out[(a, b)] = (float(rows.sum()), rows.cpu() if a in per_sample else None)
    return out


def _row_form(parts, pairs, per_sample):
    """Gram / sparse / direct / dense: row by row over the first gradient's uses."""
    out = {}
    for a, b in pairs:
        value, samples = 0.0, None
        n_samples = per_sample.get(a)
        for part in parts[a] if parts[b] else ():
            if isinstance(part, torch.Tensor):
                value += float(sum(dense_dot(part, ub) for ub in parts[b]))
                continue
            rows = sum(row_dots(part, ub) for ub in parts[b])
            value += float(rows.sum())
            if n_samples:  # a use's rows are its samples' rows one after the other
                sample = torch.arange(part.n_rows, device=rows.device) // (part.n_rows // n_samples)
                split = torch.zeros(n_samples, dtype=torch.float64, device=rows.device).index_add_(0, sample, rows)
                samples = split.cpu() if samples is None else samples + split.cpu()
        out[(a, b)] = (value, samples)
    return out


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_products(entry: PlanEntry, parts: dict, pairs, shape, per_sample: dict) -> dict:
    """{(a, b): (⟨∇_a, ∇_b⟩ on this parameter, per-sample values [n] on the CPU or None)} in ``entry.form``."""
    if entry.form == "projection":
        return _projection(parts, pairs, tuple(shape), per_sample)
    return _row_form(parts, pairs, per_sample)
