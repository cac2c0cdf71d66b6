"""`GEffectProfiler`: G-effects of an objective on risks, per group of parameters, without full gradients.

    profiler = GEffectProfiler(model, groups="layer")
    result = profiler.measure(lambda m: my_loss(m), {"forget": forget_nll, "retain": retain_nll})
    result = profiler.measure_unlearning("npo", forget_batch, retain_batch, ref_logprobs=ref)

G-effect = ∇objectiveᵀ∇risk with risk = NLL (see `result` for the sign convention). Only parameters with
``requires_grad`` take part. Each gradient is held in factored form (`capture`, `inner`); the model is left
as found: no hooks, no ``.grad``, ``requires_grad`` untouched (gradients come from ``torch.autograd.grad``).
Dropout makes every forward different: profile in ``eval()`` mode for exact values.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack

import torch

from .. import hf
from ..catalog import RETAIN_OBJECTIVES, resolve
from ..inputs import prepare_ref
from .capture import Capture, FactoredGradient
from .groups import parameter_groups
from .head import gram_pays, head_pass
from .inner import Factored, Gathered, HeadRows, Summed, dense_dot, row_dots
from .result import GEffectResult

IGNORE_INDEX = -100  # Hugging Face labels
NLL = resolve("nll", {})


def objective_from_logprobs(objective, logprobs, labels, ref_logprobs=None):
    """A resolved objective (`catalog.resolve`) as a function of the per-token log-probabilities ``[B, T]``."""
    ref = prepare_ref(ref_logprobs, labels.reshape(-1), logprobs.shape, logprobs.dtype, ignore_index=IGNORE_INDEX,
                      required_by=objective.name if objective.objective.needs_ref else None)
    return objective.loss_from_logprobs(logprobs, labels != IGNORE_INDEX,
                                        None if ref is None else ref.reshape(logprobs.shape))


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
        self.capture = Capture(model, params)
        with self.capture:
            self.hidden = hf.final_hidden_states(model, ids, mask)
        self.sides, start = {}, 0
        for name, batch in batches.items():
            n = batch["input_ids"].shape[0]
            self.sides[name] = _Side(self, name, (start, start + n), hf.batch_labels(batch)[:, 1:])
            start += n

    def splittable(self) -> bool:
        """Whether each side's gradient can be read off a stacked backward: every profiled parameter in the
        graph is used through hooked layers only, each use with one row block per sample."""
        if len(self.sides) == 1:
            return True
        n = self.hidden.shape[0]
        return self.capture.fully_captured(self.hidden) and all(
            call.rows_shape and call.rows_shape[0] == n for call in self.capture.calls)

    def gradients(self, coefs: dict, head_params, retain_graph) -> dict:
        """{side: gradient of Σ_t coef_t ℓ_t on that side} from one backward (sides not named: no gradient)."""
        hidden = self.hidden
        dh = torch.zeros_like(hidden)
        for name, coef in coefs.items():
            b0, b1 = self.sides[name].batch
            dh[b0:b1] = self.sides[name].cotangent(coef)
        if hidden.requires_grad:
            grad = self.capture.gradient(hidden, dh, retain_graph=retain_graph)
        else:  # nothing profiled below the head
            grad = FactoredGradient()
        out = {}
        for name, coef in coefs.items():
            side = self.sides[name]
            part = grad if len(self.sides) == 1 else _batch_rows(grad, side.batch, hidden.shape[0])
            out[name] = side.add_head(part, coef, head_params)
        return out


def _batch_rows(grad: FactoredGradient, batch, n_batch) -> FactoredGradient:
    """The part of a stacked gradient that samples ``batch`` = (start, stop) contributed (uses only)."""
    b0, b1 = batch
    out = FactoredGradient()
    for name, uses in grad.uses.items():
        for use, shape in zip(uses, grad.rows_shapes[name]):
            per = use.n_rows // n_batch
            rows = slice(b0 * per, b1 * per)
            if isinstance(use, Factored):
                use = Factored(use.left[rows], use.right[rows])
            elif isinstance(use, Gathered):
                use = Gathered(use.ids[rows], use.rows[rows])
            elif isinstance(use, Summed):
                use = Summed(use.rows[rows])
            else:
                raise TypeError(f"cannot split a {type(use).__name__} use by samples")
            out.uses.setdefault(name, []).append(use)
            out.rows_shapes.setdefault(name, []).append((b1 - b0, *shape[1:]))
    if grad.dense:
        raise ValueError("a stacked backward cannot split dense gradients by samples")
    return out


class _Side:
    """One batch within a `_Forward`: its rows, HF-shifted labels and, after the head pass
    (`head.head_pass`), its log-probabilities and the head's part of token objectives' gradients."""

    def __init__(self, forward, name, batch, labels):
        self.forward, self.name, self.batch = forward, name, batch
        self.labels = labels
        self.valid = self.labels != IGNORE_INDEX
        self.gram = None

    def head_rows(self):
        """(hidden rows, labels, valid) of the positions the head scores, for `head.head_pass`."""
        b0, b1 = self.batch
        hidden = self.forward.hidden[b0:b1, :-1].detach()
        return hidden.reshape(-1, hidden.shape[-1]), self.labels.reshape(-1), self.valid.reshape(-1)

    @property
    def logprobs(self):
        g = self.gram
        flat = torch.zeros(self.labels.numel(), dtype=g.logprobs[self.name].dtype, device=self.labels.device)
        return flat.index_copy_(0, g.rows[self.name], g.logprobs[self.name]).reshape(self.labels.shape)

    def coefficients(self, objective, ref_logprobs=None):
        """(loss value, ∂loss/∂ℓ_t) of a resolved objective, zero at ignored positions."""
        lp = self.logprobs.requires_grad_()
        with torch.enable_grad():
            loss = objective_from_logprobs(objective, lp, self.labels, ref_logprobs)
            coef, = torch.autograd.grad(loss, lp)
        return float(loss.detach()), torch.where(self.valid, coef, 0)

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

    def add_head(self, grad: FactoredGradient, coef, head_params) -> FactoredGradient:
        """``grad`` (the decoder's part) plus the head's uses, which read the head pass's Gram matrices."""
        g = self.gram
        head_hidden, _, _ = self.head_rows()
        for role, (name, _) in head_params.items():
            use = HeadRows(head_hidden, g.weight, g.bias, torch.where(self.valid, self.labels, 0).reshape(-1),
                           coef.reshape(-1), g.softcap, role, gram=g, side=self.name)
            grad.uses.setdefault(name, []).append(use)
            grad.rows_shapes.setdefault(name, []).append(tuple(self.labels.shape))
        return grad


class GEffectProfiler:
    """Per-group G-effects of objectives on risks for ``model`` (any HF causal LM or ``nn.Module``).

    ``groups``: ``"parameter"``, ``"layer"``, ``"component"`` or a callable name -> group (see `groups`).
    """

    def __init__(self, model: torch.nn.Module, groups: str | Callable[[str], str] = "layer"):
        self.model = model
        self.groups = parameter_groups(model, groups)

    def _params(self):
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("the model has no parameter with requires_grad=True to profile")
        return params

    # -- the generic path -----------------------------------------------------------------------------
    def measure(self, objective: Callable, risks: Mapping[str, Callable], per_instance: bool = False
                ) -> GEffectResult:
        """G-effects of ``objective`` on each of ``risks``; both are callables ``fn(model) -> scalar loss``.

        ``per_instance=True`` also returns the value per objective sample (the first dimension of the
        model's inputs); it needs every profiled parameter used through a hooked layer (Linear, Conv1D,
        Embedding, affine norms), which a model called as ``model(**batch)`` satisfies.
        """
        if not callable(objective) or not isinstance(risks, Mapping) or not risks \
                or not all(callable(r) for r in risks.values()):
            raise TypeError("measure(objective, risks): objective is a callable fn(model) -> loss and risks a "
                            "non-empty dict of such callables")
        params = self._params()
        losses = {}
        grad_a, losses["objective"] = self._gradient_of(objective, params, "objective")
        risk_grads = {}
        for name, risk in risks.items():
            risk_grads[name], losses[name] = self._gradient_of(risk, params, f"risk {name!r}")
        return self._result(grad_a, risk_grads, losses, per_instance)

    def _gradient_of(self, fn, params, what):
        capture = Capture(self.model, params)
        with capture:
            loss = fn(self.model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(f"the {what} must return a scalar tensor that depends on the model's parameters")
        return capture.gradient(loss.reshape(())), float(loss.detach())

    # -- the structured fast path ---------------------------------------------------------------------
    def measure_unlearning(self, objective: str, forget_batch, retain_batch=None, *, ref_logprobs=None,
                           retain_objective: str | None = "nll", per_instance: bool = False,
                           backend: str = "auto", **hparams) -> GEffectResult:
        """G-effects of unlearning objective ``objective`` (DESIGN §3, with ``hparams``) on the risks
        ``"forget"`` (e_u: NLL on ``forget_batch``) and ``"retain"`` (e_r: NLL on ``retain_batch``).

        Batches are HF-style dicts (``input_ids``, optional ``attention_mask`` and ``labels``; HF-shifted
        labels); ``ref_logprobs`` as for `hf.unlearning_loss`. The objective and the forget risk share one
        forward, and the LM head runs once for both batches (`head.head_pass`: log-probabilities, each
        token's hidden-state cotangent per unit coefficient, and the Gram matrices that give the head's inner
        products without its V×H gradients); the decoder's backward then starts from the hidden states, one
        per gradient (none for an objective that is a multiple of the forget NLL, e.g. ``"ga"``). The head
        pass is plain torch whatever ``backend`` (kept for compatibility) says. ``retain_objective``
        names the training step's retain term (the risks are NLL whatever it is); with ``"nll"`` (the
        default) that term's gradient *is* the retain risk's, so ``result.retain_term`` also gets the retain
        term's own G-effects on both risks from gradients already computed (no extra backward).
        ``retain_batch=None`` measures the forget risk only. ``per_instance=True`` adds values per forget
        sample.
        """
        objective = resolve(objective, hparams)  # once, and before any compute
        retain_objective = "none" if retain_objective is None else retain_objective
        for name, batch in (("forget_batch", forget_batch), ("retain_batch", retain_batch)):
            if batch is not None:
                hf.check_batch(name, batch, hf.lm_head(self.model).weight.shape[0])
        if retain_objective not in RETAIN_OBJECTIVES:
            raise ValueError(f"retain_objective must be one of {RETAIN_OBJECTIVES}, got {retain_objective!r}")
        params = self._params()
        batches = {"forget": forget_batch} if retain_batch is None else {"forget": forget_batch,
                                                                          "retain": retain_batch}
        forwards = []
        if len(batches) == 2 and _stackable(forget_batch, retain_batch):
            forwards = [_Forward(self.model, batches, params)]  # one forward (and backward) for both
            if not forwards[0].splittable():
                forwards = []
        if not forwards:
            forwards = [_Forward(self.model, {name: b}, params) for name, b in batches.items()]
        sides = {name: side for fw in forwards for name, side in fw.sides.items()}
        head = hf.lm_head(self.model)
        names = {id(p): n for n, p in params.items()}
        head_params = {role: (names[id(p)], p) for role, p in (("weight", head.weight), ("bias", head.bias))
                       if p is not None and id(p) in names}
        # One pass over the vocabulary for both sides: log-probabilities, hidden-state cotangents and, where
        # the Gram form pays, the M_x M_yᵀ that the head's inner products need (`head`).
        rows = {name: side.head_rows() for name, side in sides.items()}
        counts = {name: int(valid.sum()) for name, (_, _, valid) in rows.items()}
        wanted = [("forget", "forget")]
        if retain_batch is not None:
            wanted.append(("forget", "retain"))
            if retain_objective == "nll":
                wanted.append(("retain", "retain"))
        pairs = [(x, y) for x, y in wanted if head_params
                 and gram_pays(counts[x], counts[y], head.weight.shape[0], head.weight.shape[1])]
        with ExitStack() as stack:
            for device_type in {p.device.type for p in self.model.parameters()}:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            gram = head_pass(head.weight, head.bias, head.softcap, rows, pairs)
        for side in sides.values():
            side.gram = gram
        del rows
        losses, coefs = {}, {}
        losses["objective"], coef_a = sides["forget"].coefficients(objective, ref_logprobs)
        for name, side in sides.items():
            losses[name], coefs[name] = side.coefficients(NLL)
        not_finite = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if not_finite:
            raise ValueError(f"{not_finite} at these parameters (objective {objective.name!r}): no G-effect to "
                             f"measure")
        # When the objective's coefficients are a multiple of the NLL's (ga; nll itself), its gradient is
        # that multiple of the forget risk's: one decoder backward fewer, values scaled (exactly).
        scale = _multiple(coef_a, coefs["forget"])
        # Backward passes: each takes at most one gradient per side of a forward.
        rounds = [coefs] if scale is not None else [{"objective": coef_a, **{k: v for k, v in coefs.items()
                                                                              if k != "forget"}},
                                                    {"forget": coefs["forget"]}]
        grads = {}
        for i, requests in enumerate(rounds):
            for fw in forwards:
                mine = {("forget" if key == "objective" else key): (key, coef) for key, coef in requests.items()
                        if ("forget" if key == "objective" else key) in fw.sides}
                if not mine:
                    continue
                later = any(("forget" if k == "objective" else k) in fw.sides for r in rounds[i + 1:] for k in r)
                got = fw.gradients({side: coef for side, (_, coef) in mine.items()}, head_params,
                                   retain_graph=later)
                grads.update({key: got[side] for side, (key, _) in mine.items()})
        del forwards, sides, coefs, coef_a
        grad_a = grads.pop("objective", None)
        risk_grads = {name: grads[name] for name in batches}
        if grad_a is None:
            grad_a = risk_grads["forget"]
        result = self._result(grad_a, risk_grads, losses, per_instance, scale=scale or 1.0)
        if retain_batch is not None and retain_objective == "nll":  # its gradient is the retain risk's
            result.retain_term = self._result(risk_grads["retain"], risk_grads,
                                              {"objective": losses["retain"]}, False)
        return result

    # -- inner products into groups ---------------------------------------------------------------------
    def _result(self, grad_a: FactoredGradient, risk_grads: dict, losses: dict, per_instance: bool,
                scale: float = 1.0) -> GEffectResult:
        """Inner products of ``scale`` · ``grad_a`` with each risk's gradient, per group."""
        with ExitStack() as stack:  # inner products in float32/float64 even inside the caller's autocast
            stack.enter_context(torch.no_grad())
            for device_type in {p.device.type for p in self.model.parameters()}:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return self._inner_products(grad_a, risk_grads, losses, per_instance, scale)

    def _inner_products(self, grad_a, risk_grads, losses, per_instance, scale=1.0):
        n_samples = _batch_size(grad_a) if per_instance else None
        names = list(self._params())  # every profiled parameter, 0 where a gradient does not reach it
        total, by_group, instance = {}, {}, {}
        for risk, grad_b in risk_grads.items():
            group_sums = {}
            per_sample = torch.zeros(n_samples or 0, dtype=torch.float64)
            for name in names:
                value, rows = _inner(grad_a, grad_b, name, n_samples)
                if scale != 1.0:
                    value, rows = scale * value, None if rows is None else scale * rows
                group_sums[self.groups[name]] = group_sums.get(self.groups[name], 0.0) + value
                if rows is not None:
                    per_sample += rows
            for group, value in group_sums.items():
                by_group.setdefault(group, {})[risk] = value
            total[risk] = sum(group_sums.values())
            instance[risk] = per_sample.tolist()
        return GEffectResult(total, by_group, instance if per_instance else None, losses)


def _stackable(a, b) -> bool:
    """Whether two batches can run as one (same sequence length, device and id dtype)."""
    return (isinstance(a, Mapping) and isinstance(b, Mapping) and "input_ids" in a and "input_ids" in b
            and a["input_ids"].shape[1:] == b["input_ids"].shape[1:] and a["input_ids"].device == b["input_ids"].device
            and set(a) - {"attention_mask", "labels"} == set(b) - {"attention_mask", "labels"} == {"input_ids"})


def _multiple(coef_a: torch.Tensor, coef_b: torch.Tensor) -> float | None:
    """λ with coef_a == λ·coef_b exactly (elementwise), or None."""
    nonzero = coef_b.reshape(-1).nonzero()
    if nonzero.numel() == 0:
        return None
    i = int(nonzero[0, 0])
    scale = float(coef_a.reshape(-1)[i] / coef_b.reshape(-1)[i])
    return scale if torch.equal(coef_a, scale * coef_b) else None


def _batch_size(grad: FactoredGradient) -> int:
    """The number of samples the objective's rows split into (every use's rows are [batch, ...])."""
    if grad.dense:
        raise ValueError("per_instance=True needs every parameter's objective gradient in factored form, but "
                         f"{', '.join(grad.dense)} are used outside the hooked layers (Linear, Conv1D, Embedding, "
                         "affine norms), e.g. by a fused loss: call the model's forward in the objective or use "
                         "measure_unlearning")
    shapes = [shape for shapes in grad.rows_shapes.values() for shape in shapes]
    sizes = {shape[0] for shape in shapes}
    if len(sizes) != 1 or any(len(shape) < 2 for shape in shapes):
        raise ValueError("per_instance=True needs [batch, ...] inputs of one batch size in every layer; found "
                         f"row shapes {sorted(set(shapes))}")
    return sizes.pop()


def _parts(grad: FactoredGradient, name):
    """Parameter ``name``'s gradient as a list of parts that sum to it: a dense tensor and/or uses."""
    return ([grad.dense[name]] if name in grad.dense else []) + grad.uses.get(name, [])


def _inner(grad_a: FactoredGradient, grad_b: FactoredGradient, name, n_samples=None):
    """⟨∇_a, ∇_b⟩ restricted to parameter ``name``: (float, float64 [n_samples] on the CPU or None)."""
    parts_b = _parts(grad_b, name)
    value, per_sample = 0.0, None
    for a in _parts(grad_a, name) if parts_b else ():
        if isinstance(a, torch.Tensor):
            value += float(sum(dense_dot(a, b) for b in parts_b))
            continue
        rows = sum(row_dots(a, b) for b in parts_b)
        value += float(rows.sum())
        if n_samples:  # a use's rows are its samples' rows one after the other
            sample = torch.arange(a.n_rows, device=rows.device) // (a.n_rows // n_samples)
            part = torch.zeros(n_samples, dtype=torch.float64, device=rows.device).index_add_(0, sample, rows)
            per_sample = part.cpu() if per_sample is None else per_sample + part.cpu()
    return value, per_sample
