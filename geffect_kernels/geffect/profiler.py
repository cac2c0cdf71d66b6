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

from collections.abc import Callable, Mapping
from contextlib import ExitStack

import torch

from .. import hf
from ..inputs import Prepared, prepare_ref
from ..logprobs import token_logprobs
from ..objectives import _loss, resolve
from .capture import Capture, FactoredGradient
from .groups import parameter_groups
from .inner import HeadRows, dense_dot, row_dots
from .result import GEffectResult

IGNORE_INDEX = -100  # Hugging Face labels
RETAIN_OBJECTIVES = ("nll", "kl", "rmu", "rr", None)


def objective_from_logprobs(name, logprobs, labels, ref_logprobs=None, **hparams):
    """Objective ``name`` (DESIGN §3) as a function of the per-token log-probabilities ``[B, T]``."""
    spec, hp = resolve(name, hparams)
    prep = Prepared(None, labels.reshape(-1), logprobs.shape)
    ref = prepare_ref(ref_logprobs, prep, logprobs.dtype, ignore_index=IGNORE_INDEX,
                      required_by=name if spec.needs_ref else None)
    flat = logprobs.reshape(-1)
    return _loss(name, spec, hp, prep, ref, IGNORE_INDEX,
                 weighted=lambda weighting, scale: (weighting.weights(flat.detach(), ref) * scale * flat).sum(),
                 logprobs=lambda: flat)


class _Forward:
    """One decoder forward through the fused head: hooks' records, log-probabilities, HF-shifted labels."""

    def __init__(self, model, batch, params, backend):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("batches must be dicts with input_ids (and optionally attention_mask, labels)")
        self.capture = Capture(model, params)
        with self.capture:
            self.hidden = hf.final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"))
        self.head = hf.lm_head(model)
        labels = hf.batch_labels(batch)
        self.logprobs = token_logprobs(self.hidden, self.head.weight, labels, bias=self.head.bias,
                                       softcap=self.head.softcap, shift=True, backend=backend)
        self.labels = labels[:, 1:]
        self.valid = self.labels != IGNORE_INDEX
        names = {id(p): n for n, p in params.items()}
        self.head_params = {role: names[id(p)] for role, p in (("weight", self.head.weight),
                                                               ("bias", self.head.bias)) if id(p) in names}

    def coefficients(self, name, ref_logprobs=None, **hparams):
        """(loss value, ∂loss/∂ℓ_t), zero at ignored positions."""
        lp = self.logprobs.detach().requires_grad_()
        with torch.enable_grad():
            loss = objective_from_logprobs(name, lp, self.labels, ref_logprobs, **hparams)
            coef, = torch.autograd.grad(loss, lp)
        return float(loss.detach()), torch.where(self.valid, coef, 0)

    def gradient(self, coef, *, factored_head, retain_graph) -> FactoredGradient:
        """The gradient of Σ_t coef_t ℓ_t; the head's weight and bias as `HeadRows` uses or densely."""
        dense = () if factored_head else tuple(self.head_params.values())
        grad = self.capture.gradient(self.logprobs, coef, graph_root=self.hidden, dense=dense,
                                     retain_graph=retain_graph)
        if factored_head:
            hidden = self.hidden[:, :-1].detach()
            rows = dict(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=self.head.weight.detach(),
                        bias=None if self.head.bias is None else self.head.bias.detach(),
                        labels=torch.where(self.valid, self.labels, 0).reshape(-1), coef=coef.reshape(-1),
                        softcap=self.head.softcap)
            for role, name in self.head_params.items():
                if name not in grad.dense:  # else autograd already included the head in the dense gradient
                    grad.uses.setdefault(name, []).append(HeadRows(**rows, part=role))
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

        Batches are HF-style dicts (``input_ids``, optional ``attention_mask`` and ``labels``); losses go
        through the fused head (``geffect_kernels.hf``, shifted labels); ``ref_logprobs`` as for
        `hf.unlearning_loss`. The objective and the forget risk share one forward. ``retain_objective``
        names the training step's retain term (the risks are NLL whatever it is); with ``"nll"`` (the
        default) that term's gradient *is* the retain risk's, so ``result.retain_term`` also gets the retain
        term's own G-effects on both risks from gradients already computed (no extra backward).
        ``retain_batch=None`` measures the forget risk only. ``per_instance=True`` adds values per forget
        sample.
        """
        resolve(objective, hparams)  # fail on a bad name before any compute
        if retain_objective not in RETAIN_OBJECTIVES:
            raise ValueError(f"retain_objective must be one of {RETAIN_OBJECTIVES}, got {retain_objective!r}")
        params = self._params()
        losses = {}
        forget = _Forward(self.model, forget_batch, params, backend)
        losses["objective"], coef = forget.coefficients(objective, ref_logprobs, **hparams)
        # The fused backward forms the head's weight gradient anyway: keep it dense (one dot per risk)
        # unless per-instance values need it split by rows.
        grad_a = forget.gradient(coef, factored_head=per_instance, retain_graph=True)
        losses["forget"], coef = forget.coefficients("nll")
        risk_grads = {"forget": forget.gradient(coef, factored_head=False, retain_graph=False)}
        del forget
        if retain_batch is not None:
            retain = _Forward(self.model, retain_batch, params, backend)
            losses["retain"], coef = retain.coefficients("nll")
            risk_grads["retain"] = retain.gradient(coef, factored_head=False, retain_graph=False)
            del retain
        result = self._result(grad_a, risk_grads, losses, per_instance)
        if retain_batch is not None and retain_objective == "nll":  # its gradient is the retain risk's
            result.retain_term = self._result(risk_grads["retain"], risk_grads,
                                              {"objective": losses["retain"]}, False)
        return result

    # -- inner products into groups ---------------------------------------------------------------------
    def _result(self, grad_a: FactoredGradient, risk_grads: dict, losses: dict, per_instance: bool
                ) -> GEffectResult:
        with ExitStack() as stack:  # inner products in float32/float64 even inside the caller's autocast
            stack.enter_context(torch.no_grad())
            for device_type in {p.device.type for p in self.model.parameters()}:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return self._inner_products(grad_a, risk_grads, losses, per_instance)

    def _inner_products(self, grad_a, risk_grads, losses, per_instance):
        n_samples = _batch_size(grad_a) if per_instance else None
        names = list(self._params())  # every profiled parameter, 0 where a gradient does not reach it
        total, by_group, instance = {}, {}, {}
        for risk, grad_b in risk_grads.items():
            group_sums = {}
            per_sample = torch.zeros(n_samples or 0, dtype=torch.float64)
            for name in names:
                value, rows = _inner(grad_a, grad_b, name, n_samples)
                group_sums[self.groups[name]] = group_sums.get(self.groups[name], 0.0) + value
                if rows is not None:
                    per_sample += rows
            for group, value in group_sums.items():
                by_group.setdefault(group, {})[risk] = value
            total[risk] = sum(group_sums.values())
            instance[risk] = per_sample.tolist()
        return GEffectResult(total, by_group, instance if per_instance else None, losses)


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


def _inner(grad_a: FactoredGradient, grad_b: FactoredGradient, name, n_samples=None):
    """⟨∇_a, ∇_b⟩ restricted to parameter ``name``: (float, float64 [n_samples] on the CPU or None)."""
    parts_b = [grad_b.dense[name]] if name in grad_b.dense else grad_b.uses.get(name, [])
    if name in grad_a.dense:
        return float(sum(dense_dot(grad_a.dense[name], b) for b in parts_b)), None
    value, per_sample = 0.0, None
    for a in grad_a.uses.get(name, []) if parts_b else ():
        rows = sum(row_dots(a, b) for b in parts_b)
        value += float(rows.sum())
        if n_samples:  # a use's rows are its samples' rows one after the other
            sample = torch.arange(a.n_rows, device=rows.device) // (a.n_rows // n_samples)
            part = torch.zeros(n_samples, dtype=torch.float64, device=rows.device).index_add_(0, sample, rows)
            per_sample = part.cpu() if per_sample is None else per_sample + part.cpu()
    return value, per_sample
