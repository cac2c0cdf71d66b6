"""The unlearning pass of `GEffectProfiler.measure_unlearning` on an unsharded model: the gradients of an
objective and of the NLL risks on a forget and a retain batch, held factored, from as few forwards and backwards as
the objective allows.

The objective and the forget risk share one forward (with the retain batch too when the lengths agree and one
backward will give every gradient; on the CPU only while the stacked activations stay under `CPU_STACKED_BYTES`),
and the LM head runs once for both batches (`head`: log-probabilities, each token's hidden-state cotangent per unit
coefficient, and the head's inner products in the Gram or the projection form, whichever its cost model finds
cheaper). The decoder's backward then starts from the hidden states: one backward for every risk, and one more for
the objective unless its coefficients are a per-sample multiple of the forget NLL's (GA, NPO, SimNPO), whose
gradient is then the forget risk's scaled sample by sample. In the last backward each decoder parameter's inner
products are taken as its layer's output gradient arrives (`streaming`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .. import hf
from ..backends.autograd import compute_dtype
from ..catalog import IGNORE_INDEX, resolve
from ..objectives import unlearning_loss_from_logprobs
from . import products
from .capture import Capture, FactoredGradient, module_kind
from .head import head_costs, head_pass, head_projection_pass, head_rows, per_sample_fits, profiled_head
from .inner import HeadRows, SampleGrads, SampleScaled, sample_rows
from .streaming import StreamedProducts

# CPU only: a stacked forward's activations are twice one batch's. glibc serves blocks up to 32 MiB from its
# heap, reused; larger ones are fresh mmapped pages on every allocation, whose faults can cost more than one
# stacked forward saves (benchmarks/test_geffect.py; docs/DESIGN.md §4).
CPU_STACKED_BYTES = 32 << 20
NLL = resolve("nll", {})
OBJECTIVE = ("objective",)  # the key of the objective's gradient (risks are keyed by their names)


class Measured(NamedTuple):
    """What the pass hands to `GEffectProfiler`'s inner products: {key: `FactoredGradient`}, {result: (key of its
    first gradient, [risk keys])}, the loss values, the head pass's plan entry, the products already streamed."""

    grads: dict
    products_of: dict
    losses: dict
    head_entry: products.PlanEntry
    streamed: StreamedProducts | None


class UnlearningPass:
    """One measurement's forwards, head pass and backwards for ``model``'s profiled ``params``; ``buffers``: the
    head pass's `BufferPool`."""

    def __init__(self, model, params: dict, groups: dict, buffers):
        self.model, self.params, self.groups, self.buffers = model, params, groups, buffers
        self.device_types = {p.device.type for p in model.parameters()}

    def run(self, objective, forget_batch, retain_batch, ref_logprobs, retain_objective, per_instance) -> Measured:
        """The gradients of one measurement and what to pair them into (`GEffectProfiler.measure_unlearning`)."""
        params = self.params
        batches = {"forget": forget_batch} if retain_batch is None else {"forget": forget_batch,
                                                                          "retain": retain_batch}
        # An objective whose coefficients are a per-sample multiple of the forget NLL's (predicted from its
        # kind; checked on the coefficients below) needs no gradient of its own: one backward gives every
        # gradient, so the batches share it.
        multiple_expected = objective.objective.level == "sequence" or objective.name in ("ga", "nll")
        forwards = self._forwards(batches, params, stack=multiple_expected)
        sides = {name: side for fw in forwards for name, side in fw.sides.items()}
        retain_term = retain_batch is not None and retain_objective == "nll"
        head_params = self._head_params(params)
        dtype = compute_dtype(forwards[0].hidden.dtype)
        losses, coefs = {}, {name: side.nll_coefficients(dtype) for name, side in sides.items()}
        head_entry = self._head_pass(sides, coefs, head_params, retain_term, multiple_expected)
        losses["objective"], coef_a = sides["forget"].coefficients(objective, ref_logprobs)
        for name, side in sides.items():
            losses[name] = side.coefficients(NLL)[0]
        not_finite = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if not_finite:
            raise ValueError(f"{not_finite} at these parameters (objective {objective.name!r}): no G-effect to "
                             f"measure")
        by_samples = all(fw.by_samples for fw in forwards)  # every use splits by samples
        scale = _sample_multiples(coef_a, coefs["forget"]) if by_samples else None
        products_of = {"objective": (OBJECTIVE, list(batches))}
        if retain_term:  # its gradient is the retain risk's
            products_of["retain_term"] = ("retain", list(batches))
        stream = None
        if by_samples:  # per_sample is known here
            stream = dict(pairs=pairs_of(products_of), groups=self.groups, device_types=self.device_types,
                          per_sample={OBJECTIVE: sides["forget"].labels.shape[0]} if per_instance else {})
        grads, streamed = self._backwards(forwards, coefs, None if scale is not None else coef_a, scale, stream,
                                          hold={name for name, _ in head_params.values()})
        del forwards
        grads[OBJECTIVE] = _scaled_by_sample(grads["forget"], scale) if scale is not None else grads.pop(OBJECTIVE)
        self._add_head(grads, sides, coefs, coef_a, scale, head_params)
        return Measured(grads, products_of, losses, head_entry, streamed)

    def _forwards(self, batches, params, stack):
        """One stacked forward for both batches where asked, they fit together and split by samples (and, on
        the CPU, its activations stay under `CPU_STACKED_BYTES`); else one each. Stacking pays only with a
        single backward: the objective's own backward, and then the forget risk's, would each run over the
        retain rows too, with zero cotangents (docs/DESIGN.md §4)."""
        if stack and len(batches) == 2 and _stackable(*batches.values()) and self._stack_fits(batches):
            forward = _Forward(self.model, batches, params)
            if forward.by_samples:
                return [forward]
        return [_Forward(self.model, {name: b}, params) for name, b in batches.items()]

    def _stack_fits(self, batches) -> bool:
        weight = hf.lm_head(self.model).weight
        if weight.device.type != "cpu":
            return True
        tokens = sum(b["input_ids"].numel() for b in batches.values())
        return tokens * _widest_row(self.model) * weight.element_size() <= CPU_STACKED_BYTES

    def _head_params(self, params):
        """{"weight"/"bias": (name, parameter)} of the LM head's profiled parameters: with a LoRA adapter on the
        head, its B ("weight": columns of the concatenated weight; its A is a hooked layer of the forward)."""
        return profiled_head(self.model, params).params

    def _head_pass(self, sides, coefs, head_params, retain_term, multiple_expected) -> products.PlanEntry:
        """Run the head pass for every side in the form its cost model picks; returns that plan entry."""
        head = profiled_head(self.model, self.params)  # weight: [W, B] with a LoRA adapter on the head
        weight, columns = head.weight, head.columns
        vocab, width = weight.shape
        rows = {name: side.head_rows() for name, side in sides.items()}
        counts = {name: int(valid.sum()) for name, (_, _, valid) in rows.items()}
        pairs = [("forget", "forget")] + [("forget", "retain")] * ("retain" in sides) + \
            [("retain", "retain")] * retain_term
        n_samples = sides["forget"].labels.shape[0]
        per_sample = per_sample_fits(n_samples, vocab, width)
        objective_rows = 0 if multiple_expected and per_sample else counts["forget"]
        held = (n_samples if per_sample else 1) + len(sides) - 1 + (objective_rows > 0)  # risks' + objective's
        costs = head_costs(counts, pairs if head_params else [], vocab, width, objective_rows, held)
        form = products.choose(costs) if head_params else "gram"
        with products.exact_arithmetic(self.device_types):
            if form == "gram":
                gram = head_pass(weight, head.bias, head.softcap, rows, pairs if head_params else [], columns)
            else:
                gram = head_projection_pass(weight, head.bias, head.softcap, rows, coefs,
                                            per_sample=("forget",) if per_sample else (), pool=self.buffers,
                                            columns=columns)
        for side in sides.values():
            side.gram = gram
        return products.PlanEntry("(head pass)", "head", form, costs[form], costs)

    def _backwards(self, forwards, coefs, coef_a, scale, stream, hold=()):
        """The decoder's part of each risk's gradient (and of the objective's, for ``coef_a``; else it is the
        forget risk's times ``scale``): at most one gradient per side of a forward per backward.

        With ``stream`` (`StreamedProducts` settings), the last backward hands every parameter it can (not in
        ``hold``) to a `StreamedProducts` that also holds the gradients so far: all of that parameter's
        products are taken as its layer's output gradient arrives. Returns (gradients, it or None).
        """
        rounds = [coefs] if coef_a is None else [
            {OBJECTIVE: coef_a, **{k: v for k, v in coefs.items() if k != "forget"}}, {"forget": coefs["forget"]}]
        side_of = lambda key: "forget" if key == OBJECTIVE else key
        steps = [(i, fw) for i, requests in enumerate(rounds) for fw in forwards
                 if any(side_of(key) in fw.sides for key in requests)]
        grads, streamed = {}, None
        for n, (i, fw) in enumerate(steps):
            mine = {side_of(key): (key, coef) for key, coef in rounds[i].items() if side_of(key) in fw.sides}
            later = any(side_of(k) in fw.sides for r in rounds[i + 1:] for k in r)
            if stream is not None and n == len(steps) - 1:
                held = dict(grads)
                if scale is not None and "forget" in held:
                    held[OBJECTIVE] = _scaled_by_sample(held["forget"], scale)
                arriving = {key: fw.sides[side].batch for side, (key, _) in mine.items()}
                scaled = {OBJECTIVE: ("forget", scale)} if scale is not None and "forget" in arriving else {}
                streamed = StreamedProducts(arriving, fw.hidden.shape[0], scaled, held, **stream)
            got = fw.gradients({side: coef for side, (_, coef) in mine.items()}, retain_graph=later,
                               streamed=streamed, hold=hold)
            grads.update({key: got[side] for side, (key, _) in mine.items()})
        return grads, streamed

    def _add_head(self, grads, sides, coefs, coef_a, scale, head_params):
        """The head's uses in every gradient: Gram-form rows, or the projection pass's dense gradients."""
        gram = sides["forget"].gram
        for key, side, coef in [(OBJECTIVE, "forget", coef_a), *[(n, n, c) for n, c in coefs.items()]]:
            uses = {}
            for role, (name, _) in head_params.items():
                held = gram.risk_grads.get(side)
                if key != OBJECTIVE and held is not None:
                    uses[name] = SampleGrads(held[0] if role == "weight" else held[1])
                elif key == OBJECTIVE and held is not None and scale is not None and held[0].shape[0] == scale.shape[0]:
                    uses[name] = SampleScaled(SampleGrads(held[0] if role == "weight" else held[1]), scale)
                else:
                    uses[name] = HeadRows(gram, side, coef.reshape(-1), role)
            _add_uses(grads[key], uses, sides[side].labels.shape)


class _Forward:
    """One decoder forward (hooks recording) over one or more batches stacked along the batch dimension.

    Stacked batches (*sides*) share the forward and each backward: the captured rows of a side are its
    samples' rows, so one backward from the sides' stacked hidden-state cotangents gives every side's
    gradient at once (`_batch_rows`). Rows of different samples never mix in a causal LM's forward.
    """

    def __init__(self, model, batches: dict, params):
        for batch in batches.values():
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError("batches must be dicts with input_ids (and optionally attention_mask, labels)")
        ids = torch.cat([b["input_ids"] for b in batches.values()])
        masks = [b.get("attention_mask") for b in batches.values()]
        mask = None if all(m is None for m in masks) else torch.cat(
            [torch.ones_like(b["input_ids"]) if m is None else m for b, m in zip(batches.values(), masks)])
        self.capture = Capture(model, params, stream=True)
        try:
            with self.capture:
                self.hidden = head_rows(model, ids, mask)
        except RuntimeError as error:
            if "custom Function" not in str(error):
                raise
            # the model modifies a layer's output in place, which a streamed capture's view of it forbids
            self.capture = Capture(model, params)
            with self.capture:
                self.hidden = head_rows(model, ids, mask)
        self.sides, start = {}, 0
        for name, batch in batches.items():
            n = batch["input_ids"].shape[0]
            self.sides[name] = _Side(self, name, (start, start + n), hf.batch_labels(batch)[:, 1:])
            start += n

    @functools.cached_property
    def by_samples(self) -> bool:
        """Whether the gradients split by samples: every profiled parameter in the graph is used through
        hooked layers only, each use with one row block per sample (needed to read each side's gradient off
        a stacked backward, and to scale a gradient sample by sample). Walks the graph once per forward."""
        n = self.hidden.shape[0]
        return self.capture.fully_captured(self.hidden) and all(
            call.rows_shape and call.rows_shape[0] == n for call in self.capture.calls)

    def gradients(self, coefs: dict, retain_graph, streamed=None, hold=()) -> dict:
        """{side: the decoder's part of the gradient of Σ_t coef_t ℓ_t on that side} from one backward;
        with ``streamed`` (a `StreamedProducts`), the parameters it can take are given to it instead."""
        hidden = self.hidden
        dh = torch.zeros_like(hidden)
        for name, coef in coefs.items():
            b0, b1 = self.sides[name].batch
            dh[b0:b1] = self.sides[name].cotangent(coef)
        if hidden.requires_grad:
            on_use = streamed if streamed is not None and self.capture.stream else None
            grad = self.capture.gradient(hidden, dh, retain_graph=retain_graph, on_use=on_use, hold=hold)
        else:  # nothing profiled below the head
            grad = FactoredGradient()
        if len(self.sides) == 1:
            return {name: grad for name in coefs}
        return {name: _batch_rows(grad, self.sides[name].batch, hidden.shape[0]) for name in coefs}


def _batch_rows(grad: FactoredGradient, batch, n_batch) -> FactoredGradient:
    """The part of a stacked gradient that samples ``batch`` = (start, stop) contributed (uses only)."""
    if grad.dense:
        raise ValueError("a stacked backward cannot split dense gradients by samples")
    out = FactoredGradient()
    for name, uses in grad.uses.items():
        out.uses[name] = [sample_rows(use, *batch, n_batch) for use in uses]
        out.rows_shapes[name] = [(batch[1] - batch[0], *shape[1:]) for shape in grad.rows_shapes[name]]
    return out


def _scaled_by_sample(grad: FactoredGradient, scale) -> FactoredGradient:
    """``grad`` with sample s's rows times ``scale[s]`` in every use (the uses themselves are shared)."""
    out = FactoredGradient(rows_shapes={k: list(v) for k, v in grad.rows_shapes.items()})
    for name, uses in grad.uses.items():
        out.uses[name] = [SampleScaled(use, scale) for use in uses]
    return out


class _Side:
    """One batch within a `_Forward`: its rows, HF-shifted labels and, after the head pass
    (`head`), its log-probabilities and the hidden-state direction of each token."""

    def __init__(self, forward, name, batch, labels):
        self.forward, self.name, self.batch = forward, name, batch
        self.labels = labels
        self.valid = self.labels != IGNORE_INDEX
        self.gram = None

    def head_rows(self):
        """(hidden rows [B, T-1, H], labels, valid) of the positions the head scores, for the head pass."""
        b0, b1 = self.batch
        return self.forward.hidden[b0:b1, :-1].detach(), self.labels, self.valid

    @property
    def logprobs(self):
        g = self.gram
        flat = torch.zeros(self.labels.numel(), dtype=g.logprobs[self.name].dtype, device=self.labels.device)
        return flat.index_copy_(0, g.rows[self.name], g.logprobs[self.name]).reshape(self.labels.shape)

    def coefficients(self, objective, ref_logprobs=None, logprobs=None):
        """(loss value, ∂loss/∂ℓ_t) of a resolved objective, zero at ignored positions; at ``logprobs``
        (default: the head pass's)."""
        lp = (self.logprobs if logprobs is None else logprobs).requires_grad_()
        with torch.enable_grad():
            loss = unlearning_loss_from_logprobs(objective, lp, self.labels, ref_logprobs=ref_logprobs)
            coef, = torch.autograd.grad(loss, lp)
        return float(loss.detach()), torch.where(self.valid, coef, 0)

    def nll_coefficients(self, dtype):
        """The NLL's coefficients, known before the head pass (they do not depend on ℓ)."""
        return self.coefficients(NLL, logprobs=torch.zeros(self.labels.shape, dtype=dtype))[1]

    def cotangent(self, coef):
        """dh_t = coef_t d_t on this side's hidden states ``[B, T, H]`` (0 at the last position)."""
        g, hidden = self.gram, self.forward.hidden
        rows = g.rows[self.name]
        dh = torch.zeros(self.labels.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        dh.index_copy_(0, rows, (coef.reshape(-1)[rows].to(g.direction[self.name].dtype).unsqueeze(1)
                                 * g.direction[self.name]).to(hidden.dtype))
        return torch.cat([dh.reshape(*self.labels.shape, -1),
                          torch.zeros(self.labels.shape[0], 1, hidden.shape[-1], dtype=hidden.dtype,
                                      device=hidden.device)], dim=1)


def _add_uses(grad: FactoredGradient, uses: dict, rows_shape) -> FactoredGradient:
    for name, use in uses.items():
        grad.uses.setdefault(name, []).append(use)
        grad.rows_shapes.setdefault(name, []).append(tuple(rows_shape))
    return grad


def pairs_of(products_of):
    """Every (first gradient, risk) pair the results of ``products_of`` need."""
    return [(a, risk) for a, risks in products_of.values() for risk in risks]


def _stackable(a, b) -> bool:
    """Whether two batches can run as one (same sequence length, device and id dtype)."""
    return (isinstance(a, Mapping) and isinstance(b, Mapping) and "input_ids" in a and "input_ids" in b
            and a["input_ids"].shape[1:] == b["input_ids"].shape[1:] and a["input_ids"].device == b["input_ids"].device
            and set(a) - {"attention_mask", "labels"} == set(b) - {"attention_mask", "labels"} == {"input_ids"})


def _widest_row(model) -> int:
    """The widest activation row of the decoder: the largest dimension of any linear or norm weight below the
    LM head (an MLP's intermediate size in a transformer)."""
    head = hf.lm_head(model).weight
    return max((max(m.weight.shape) for m in model.modules()
                if module_kind(m) in ("linear", "conv1d", "norm") and m.weight is not head), default=head.shape[1])


def _sample_multiples(coef_a: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor | None:
    """λ (float64, one per sample) with coef_a[s] == λ_s·coef_b[s] for every sample s, or None.

    Exact up to the rounding of λ_s itself (a few ulps of each coefficient): λ is read at each sample's first
    nonzero coef_b; a sample where coef_b is all 0 needs coef_a all 0 there (λ = 0).
    """
    a, b = coef_a.reshape(coef_a.shape[0], -1).double(), coef_b.reshape(coef_b.shape[0], -1).double()
    nonzero = b != 0
    first = nonzero.to(torch.int8).argmax(1, keepdim=True)
    scale = torch.where(nonzero.any(1), (a.gather(1, first) / b.gather(1, first).where(nonzero.any(1, keepdim=True),
                                                                                    1.0)).squeeze(1), 0.0)
    eps = torch.finfo(coef_a.dtype).eps
    ok = ((a - scale.unsqueeze(1) * b).abs() <= 4 * eps * a.abs()).all()
    return scale if bool(ok) else None
