"""The inner products of one measurement, parameter by parameter, each in the form its cost model picks.

For a linear layer's weight (DESIGN §4) the Gram form costs 2·n_a·n_b·(p+q) flops per distinct pair of
uses (⟨u, v⟩ serves (u, v) and (v, u)) and the projection form 2·n·p·q per use; the cheaper is taken
(`choose`), per parameter, from the shapes at hand. The projection form (`_Basis`) materializes each use
once — per sample where a per-instance value or a per-sample multiple (NPO's gradient is the forget NLL's
scaled sample by sample) needs it: one batched matmul, no more flops than the whole — and every pair then
costs one matrix-vector product per block of rows and second gradient (shared by the first gradients that
use the block). Per-instance values come from either: the Gram form's rows, or the per-sample rows, held
only while they fit in `SAMPLE_ELEMENTS` (past it the Gram form is forced for that parameter). Embeddings
take their sparse rows, vectors (norms, biases) their sums per sample (the projection form, for free), a
parameter used outside the hooked layers its dense gradient; the LM head of `measure_unlearning` takes the
form its head pass was run in (`head.head_costs`). Everything a parameter needs is computed once for all
pairs and dropped before the next parameter, so at most one parameter's materialized gradients live.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from .inner import Gathered, HeadRows, SampleGrads, SampleScaled, Summed, dense_dot, row_dots, sample_dense

# Largest per-sample materialized gradient (elements) of one parameter: B × p × q.
SAMPLE_ELEMENTS = 1 << 28


@dataclass
class PlanEntry:
    """How one parameter's (or the head pass's) inner products are computed, and the estimated flops (the
    head's parameters take the form of the head pass, whose entry carries their flops)."""
    parameter: str
    group: str
    form: str
    flops: float
    costs: dict = field(default_factory=dict)  # every form considered -> estimated flops

    def to_dict(self):
        return {"parameter": self.parameter, "group": self.group, "form": self.form, "flops": self.flops,
                "costs": self.costs}


@contextmanager
def exact_arithmetic(device_types):
    """No autograd, and no autocast on ``device_types``: inner products in float32/float64 even inside the
    caller's autocast (or a backward run under it)."""
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type in device_types:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def choose(costs: dict) -> str:
    """The cheapest form (the one seam where tests force a form)."""
    return min(costs, key=costs.get)


def _base(use):
    return use.base if isinstance(use, SampleScaled) else use


def _pair_gram_flops(a, b):
    return _base(a).gram_flops(_base(b))


def _distinct_pairs(parts, pairs):
    """The pairs of uses whose rows the row forms compute: ⟨u, v⟩ is taken once for (u, v) and (v, u)
    (`_row_form`), scaled uses by their bases."""
    seen = {}
    for a, b in pairs:
        for ua in parts[a]:
            for ub in parts[b]:
                seen.setdefault(frozenset((id(_base(ua)), id(ub))), (ua, ub))
    return seen.values()


def _costs(parts: dict, pairs, numel: int, per_sample: dict) -> dict:
    """Gram and projection flops of a parameter whose uses are Factored (and Gathered, tied embeddings)."""
    gram = sum(_pair_gram_flops(ua, ub) for ua, ub in _distinct_pairs(parts, pairs))
    held, _ = _holding(parts, list(parts), per_sample, numel)
    projection = sum(_base(base).dense_flops(numel) for base, _ in held.values())
    n_rows = sum(n for _, n in held.values())
    projection += 2 * numel * n_rows * len({b for _, b in pairs})  # a block of rows against each b
    if any(n * numel > SAMPLE_ELEMENTS for n in per_sample.values()):
        projection = float("inf")  # per-instance values would need per-sample buffers past the limit
    return {"gram": gram, "projection": projection}


def plan_parameter(name, group, parts: dict, pairs, numel, per_sample: dict, head_entry=None) -> PlanEntry:
    """The form for one parameter, given its ``parts`` ({gradient key: [uses or dense tensors]})."""
    uses = [_base(u) for key in parts for u in parts[key]]
    if any(isinstance(u, torch.Tensor) for u in uses):
        return PlanEntry(name, group, "dense", 0.0)
    if any(isinstance(u, (HeadRows, SampleGrads)) for u in uses):  # the LM head: the form of its pass
        if head_entry is not None:  # its flops are on the head pass's entry (counted once)
            return PlanEntry(name, group, head_entry.form, 0.0)
        return PlanEntry(name, group, "projection" if any(isinstance(u, SampleGrads) for u in uses) else "gram", 0.0)
    if all(isinstance(u, Summed) for u in uses):
        return PlanEntry(name, group, "direct", float(sum(2 * numel * len(parts[b]) for _, b in pairs)))
    if all(isinstance(u, Gathered) for u in uses):
        return PlanEntry(name, group, "sparse", float(sum(_pair_gram_flops(ua, ub)
                                                          for ua, ub in _distinct_pairs(parts, pairs))))
    costs = _costs(parts, pairs, numel, per_sample)
    form = choose(costs)
    return PlanEntry(name, group, form, costs[form], costs)


def _holding(parts, keys, per_sample, numel):
    """How `_Basis` holds a parameter's gradients: ({id(base use): [base, samples it is held per]},
    {key: [(id(base), coefficient: 1.0 or a per-sample scale)]}); a per-sample multiple past `SAMPLE_ELEMENTS`
    is its own base (its rows scaled: `SampleScaled.explicit`)."""
    held, terms = {}, {key: [] for key in keys}
    for key in keys:
        for use in parts[key]:
            base, n, coef = use, per_sample.get(key, 1), 1.0
            if isinstance(use, SampleScaled) and (isinstance(use.base, SampleGrads)
                                                  or use.scale.shape[0] * numel <= SAMPLE_ELEMENTS):
                base, n, coef = use.base, use.scale.shape[0], use.scale  # shared with the base's own key
            entry = held.setdefault(id(base), [base, 1])
            if n != 1 and entry[1] not in (1, n):
                raise ValueError(f"a gradient is needed per {entry[1]} and per {n} samples")
            entry[1] = max(entry[1], n)
            terms[key].append((id(base), coef))
    return held, terms


class _Basis:
    """One parameter's gradients as combinations of a few materialized gradients (*rows*, ``numel`` each):
    each use once, per sample where a per-instance value or a per-sample multiple (`SampleScaled`) needs it,
    else whole; a gradient already dense per sample (the head pass's) is taken as it is held, not summed.
    Gradient a = Σ_k c_a[k] row_k, so row k's share of ⟨a, b⟩ is c_a[k] ⟨row_k, b⟩: one matrix-vector
    product of each block of rows with b's whole gradient, shared by every a that uses the block (these
    products are memory-bound: a block is read once per b)."""

    def __init__(self, parts, keys, per_sample, shape):
        held, terms = _holding(parts, keys, per_sample, _numel(shape))
        self.blocks, block_of = [], {}  # blocks: (first row, rows [n, numel])
        n_rows = 0
        for key_id, (base, n) in held.items():
            if isinstance(base, SampleGrads) and n == 1:
                n = base.grads.shape[0]  # its samples as rows: no sum
            block_of[key_id] = len(self.blocks)
            if isinstance(base, SampleScaled):
                base = base.explicit()
            self.blocks.append((n_rows, sample_dense(base, n, shape).reshape(n, -1)))
            n_rows += n
        device = self.blocks[0][1].device
        self.coef = {key: torch.zeros(n_rows, dtype=torch.float64, device=device) for key in keys}
        # Which blocks each gradient uses, and where it is one block's single row with weight 1, known from
        # the terms: reading the coefficients would sync a GPU inside the backward (`streaming`).
        self._block_ids = {key: sorted({block_of[key_id] for key_id, _ in key_terms})
                          for key, key_terms in terms.items()}
        self._is_row = {key: len(key_terms) == 1 and isinstance(key_terms[0][1], float) and key_terms[0][1] == 1.0
                        and self.blocks[block_of[key_terms[0][0]]][1].shape[0] == 1
                        for key, key_terms in terms.items()}
        for key, key_terms in terms.items():
            for key_id, c in key_terms:
                k0, rows = self.blocks[block_of[key_id]]
                self.coef[key][k0:k0 + rows.shape[0]] += c
        self._wholes, self._dots = {}, {}

    def _used(self, key):
        """(block index, first row, rows, coefficients) of the blocks gradient ``key`` uses."""
        for i in self._block_ids[key]:
            k0, rows = self.blocks[i]
            yield i, k0, rows, self.coef[key][k0:k0 + rows.shape[0]]

    def whole(self, key) -> torch.Tensor:
        """Gradient ``key`` ``[numel]``: Σ_k c[k] row_k (the row itself where it is the only one, weight 1)."""
        if key not in self._wholes:
            total = None
            for _, _, rows, c in self._used(key):
                part = rows[0] if self._is_row[key] else c.to(rows.dtype) @ rows
                total = part if total is None else total + part
            self._wholes[key] = total
        return self._wholes[key]

    def row_dots(self, a, b) -> torch.Tensor:
        """Each row's share of ⟨a, b⟩, float64 ``[rows]`` (0 on the rows a does not use)."""
        out = torch.zeros_like(self.coef[a])
        for i, k0, rows, c in self._used(a):
            if (i, b) not in self._dots:
                self._dots[(i, b)] = (rows @ self.whole(b)).double()
            out[k0:k0 + rows.shape[0]] = c * self._dots[(i, b)]
        return out

    def samples(self, a, n_samples) -> torch.Tensor:
        """The sample of each row, for a's per-instance values (every block a uses holds ``n_samples`` rows)."""
        out = torch.zeros(self.coef[a].shape, dtype=torch.long, device=self.coef[a].device)
        for _, k0, rows, _ in self._used(a):
            if rows.shape[0] != n_samples:
                raise ValueError(f"a gradient held for {rows.shape[0]} samples cannot be split into {n_samples}")
            out[k0:k0 + n_samples] = torch.arange(n_samples, device=out.device)
        return out


def _projection(parts, pairs, shape, per_sample):
    keys = list(dict.fromkeys(k for pair in pairs for k in pair))
    basis, out = _Basis(parts, keys, per_sample, shape), {}
    for a, b in pairs:
        if not parts[a] or not parts[b]:
            out[(a, b)] = (0.0, None)
            continue
        rows = basis.row_dots(a, b)
        samples = None
        if a in per_sample:
            samples = torch.zeros(per_sample[a], dtype=torch.float64, device=rows.device).index_add_(
                0, basis.samples(a, per_sample[a]), rows)
        out[(a, b)] = (rows.sum(), samples)
    return out


def _row_form(parts, pairs, per_sample):
    """Gram / sparse / direct / dense: row by row over the first gradient's uses. Rows of a use against
    another are computed once (a scaled use's from its base's); where only the total is wanted, ⟨u, v⟩ comes
    from v's rows against u when those exist ((retain, forget) from (objective, retain) when the objective
    is a multiple of the forget risk's)."""
    out, memo = {}, {}

    def rows_of(ua, ub):
        key = (id(_base(ua)), id(ub))
        if key not in memo:
            memo[key] = row_dots(_base(ua), ub)
        return memo[key] * ua.row_scale(torch.float64) if isinstance(ua, SampleScaled) else memo[key]

    for a, b in pairs:
        value, samples = 0.0, None
        n_samples = per_sample.get(a)
        for part in parts[a] if parts[b] else ():
            if isinstance(part, torch.Tensor):
                value = value + sum(dense_dot(part, ub) for ub in parts[b])
                continue
            if not n_samples and not isinstance(part, SampleScaled) and all(
                    (id(ub), id(part)) in memo for ub in parts[b]):
                value = value + sum(memo[(id(ub), id(part))].sum() for ub in parts[b])
                continue
            rows = sum(rows_of(part, ub) for ub in parts[b])
            value = value + rows.sum()
            if n_samples:  # a use's rows are its samples' rows one after the other
                sample = torch.arange(part.n_rows, device=rows.device) // (part.n_rows // n_samples)
                split = torch.zeros(n_samples, dtype=torch.float64, device=rows.device).index_add_(0, sample, rows)
                samples = split if samples is None else samples + split
        out[(a, b)] = (value, samples)
    return out


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_products(entry: PlanEntry, parts: dict, pairs, shape, per_sample: dict) -> dict:
    """{(a, b): (⟨∇_a, ∇_b⟩ on this parameter, per-sample values [n] or None)} in ``entry.form``: float64
    tensors on the parameter's device (0.0 where a side has no use), left there so that no value is read
    back before the measurement ends (`on_host`)."""
    if entry.form in ("projection", "direct"):  # direct: a vector's gradient is its rows' sum (per sample)
        return _projection(parts, pairs, tuple(shape), per_sample)
    return _row_form(parts, pairs, per_sample)


def on_host(values: dict) -> dict:
    """``values`` ({pair: {parameter: (value, per-sample values or None)}}, as `parameter_products` leaves
    them) with floats and CPU tensors in place of device tensors: one copy per device for all of them."""
    found = [(pair, name, i, t) for pair, by_name in values.items() for name, entry in by_name.items()
             for i, t in enumerate(entry) if isinstance(t, torch.Tensor)]
    out = {pair: {name: list(entry) for name, entry in by_name.items()} for pair, by_name in values.items()}
    for device in dict.fromkeys(t.device for *_, t in found):
        here = [item for item in found if item[3].device == device]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for *_, t in here]).cpu()
        for (pair, name, i, t), host in zip(here, flat.split([t.numel() for *_, t in here])):
            out[pair][name][i] = float(host) if i == 0 else host
    return {pair: {name: tuple(entry) for name, entry in by_name.items()} for pair, by_name in out.items()}
