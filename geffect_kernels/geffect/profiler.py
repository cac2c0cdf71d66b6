"""`GEffectProfiler`: G-effects of an objective on risks, per group of parameters, without full gradients.

    profiler = GEffectProfiler(model, groups="layer")
    result = profiler.measure(lambda m: my_loss(m), {"forget": forget_nll, "retain": retain_nll})
    result = profiler.measure_unlearning("npo", forget_batch, retain_batch, ref_logprobs=ref)
    print(result.explain())  # which form each parameter's inner products took, and its estimated cost

G-effect = ∇objectiveᵀ∇risk with risk = NLL (see `result` for the sign convention). Only parameters with
``requires_grad`` take part. Each gradient is held in factored form (`capture`, `inner`) and every parameter's
inner products are taken in the cheaper of the Gram and projection forms (`products`); the model is left
as found: no hooks, no ``.grad``, ``requires_grad`` untouched (gradients come from ``torch.autograd.grad``).
Dropout makes every forward different: profile in ``eval()`` mode for exact values. The forwards and backwards
of `measure_unlearning` are the `unlearning` pass's; a sharded model's measurements are `sharded`'s.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .. import hf
from .. import objective_inputs
from ..catalog import ALTERNATE, FORGET, RETAIN_OBJECTIVES, RETAIN_TERMS, resolve
from ..objective_inputs import ReferenceState
from . import products, sharded
from .buffers import BufferPool
from .capture import Capture, FactoredGradient
from .groups import parameter_groups
from .result import GEffectResult
from .unlearning import OBJECTIVE, UnlearningPass, pairs_of


class GEffectProfiler:
    """Per-group G-effects of objectives on risks for ``model`` (any HF causal LM or ``nn.Module``).

    ``groups``: ``"parameter"``, ``"layer"``, ``"component"`` or a callable name -> group (see `groups`).
    ``explain=True`` prints each measurement's plan (`GEffectResult.explain`): the form each parameter's
    inner products took and the estimated flops of each form; it is in ``result.plan`` either way.
    """

    def __init__(self, model: torch.nn.Module, groups: str | Callable[[str], str] = "layer", explain: bool = False):
        self.model = model
        self.groups = parameter_groups(model, groups)
        self.explain = explain
        self._buffers = BufferPool()  # the head pass's V×H buffers, kept from one measurement to the next (CPU)

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
        _refuse_reentrant_checkpointing(self.model)
        if sharded.is_sharded(self.model):  # FSDP2: per-shard dot products of the reduce-scattered gradients
            _refuse_per_instance_when_sharded(per_instance)
            return sharded.measure(self, objective, risks)
        params = self._params()
        grads, losses = {}, {}
        grads[OBJECTIVE], losses["objective"] = self._gradient_of(objective, params, "objective")
        for name, risk in risks.items():
            grads[name], losses[name] = self._gradient_of(risk, params, f"risk {name!r}")
        return self._results(grads, {"objective": (OBJECTIVE, list(risks))}, losses, per_instance)

    def _gradient_of(self, fn, params, what):
        capture = Capture(self.model, params)
        with capture:
            loss = fn(self.model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(f"the {what} must return a scalar tensor that depends on the model's parameters")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(f"the {what} is {value} at these parameters: no G-effect to measure")
        return capture.gradient(loss.reshape(())), value

    # -- the structured fast path ---------------------------------------------------------------------
    def measure_unlearning(self, objective: str, forget_batch, retain_batch=None, *, ref_logprobs=None,
                           retain_objective: str | None = "nll", per_instance: bool = False,
                           reference: ReferenceState | None = None, **hparams) -> GEffectResult:
        """G-effects of unlearning objective ``objective`` (DESIGN §3, with ``hparams``) on the risks
        ``"forget"`` (e_u: NLL on ``forget_batch``) and ``"retain"`` (e_r: NLL on ``retain_batch``).

        Batches are HF-style dicts (``input_ids``, optional ``attention_mask`` and ``labels``; HF-shifted
        labels); ``ref_logprobs`` as for `hf.unlearning_loss`. The forwards and backwards are as few as the
        objective allows (`unlearning`: one forward and one backward for GA, NPO and SimNPO on batches of one
        length, the LM head once for both batches). ``retain_objective`` names the training step's retain
        term (the risks are NLL whatever it is); with ``"nll"`` (the default) that term's gradient *is* the
        retain risk's, so ``result.retain_term`` also gets the retain term's own G-effects on both risks from
        gradients already computed (no extra backward). ``retain_batch=None`` measures the forget risk only.
        ``per_instance=True`` adds values per forget sample.

        Objectives that read more than the forget answers' log-probabilities (PO and DPO the substitute answers
        ``forget_batch`` carries, `objective_inputs.side`; RMU a layer's activations) and retain terms other than
        ``"nll"`` (KL, RR: ``result.retain_term``) are measured on the generic path (`measure`) from their
        `objective_inputs.loss`; ``reference`` (a `objective_inputs.ReferenceState`) holds what they compare with
        (the substitute answers' reference log-probabilities, the starting model, RMU's seed).
        """
        objective = resolve(objective, hparams)  # once, and before any compute
        _refuse_reentrant_checkpointing(self.model)
        retain_objective = "none" if retain_objective is None else retain_objective
        vocab = hf.lm_head(self.model).weight.shape[0]
        for name, batch in (("forget_batch", forget_batch), ("retain_batch", retain_batch)):
            if batch is not None:
                hf.check_batch(name, objective_inputs.side(batch, FORGET), vocab)
        if objective.objective.reads_alternate:
            hf.check_batch("forget_batch's substitute answers", objective_inputs.side(forget_batch, ALTERNATE), vocab)
        if retain_objective not in RETAIN_OBJECTIVES:
            raise ValueError(f"retain_objective must be one of {RETAIN_OBJECTIVES}, got {retain_objective!r}")
        state = reference if reference is not None else ReferenceState()
        if ref_logprobs is not None:
            state = ReferenceState(ref_logprobs, state.alternate_logprobs, state.model, state.seed)
        if not objective.objective.gradient_on_forget_logprobs:
            result = self._measure_generic(objective, forget_batch, retain_batch, state, per_instance)
        elif sharded.is_sharded(self.model):  # FSDP2: each rank passes its slice of the batches
            _refuse_per_instance_when_sharded(per_instance)
            result = sharded.measure_unlearning(self, objective, forget_batch, retain_batch,
                                                ref_logprobs=state.logprobs, retain_objective=retain_objective,
                                                **hparams)
        else:
            try:
                measured = UnlearningPass(self.model, self._params(), self.groups, self._buffers).run(
                    objective, forget_batch, retain_batch, state.logprobs, retain_objective, per_instance)
                result = self._results(measured.grads, measured.products_of, measured.losses, per_instance,
                                       measured.head_entry, measured.streamed)
            finally:
                self._buffers.reclaim()  # nothing of that measurement is left to hold them
        term = RETAIN_TERMS.get(retain_objective)
        if retain_batch is not None and term is not None and getattr(result, "retain_term", None) is None:
            # the retain batch has none of the forget answers' reference log-probabilities: the starting model, the seed
            retain_state = ReferenceState(model=state.model, seed=state.seed)
            result.retain_term = self.measure_retain_term(retain_objective, forget_batch, retain_batch, retain_state,
                                                          layer=objective.hparams.get("layer"))
        return result

    def _risks(self, forget_batch, retain_batch) -> dict:
        """The NLL risks on the forget answers and the retain batch, as callables."""
        nll = resolve("nll", {})
        risks = {"forget": lambda m: objective_inputs.loss(nll, m, objective_inputs.side(forget_batch, FORGET))}
        if retain_batch is not None:
            risks["retain"] = lambda m: objective_inputs.loss(nll, m, objective_inputs.side(retain_batch, FORGET))
        return risks

    def _measure_generic(self, objective, forget_batch, retain_batch, state, per_instance) -> GEffectResult:
        """`measure` of the objective's `objective_inputs.loss` on the NLL risks."""
        result = self.measure(lambda m: objective_inputs.loss(objective, m, forget_batch, state),
                              self._risks(forget_batch, retain_batch), per_instance=per_instance)
        result.retain_term = None
        return result

    def measure_retain_term(self, retain_objective: str, forget_batch, retain_batch, reference=None, *,
                            layer=None) -> GEffectResult:
        """G-effects of retain term ``retain_objective`` (`catalog.RETAIN_TERMS`: nll, kl, rr) on retain
        ``retain_batch`` on the NLL risks of both batches; ``reference``: its `ReferenceState` (KL and RR: the starting
        model), ``layer``: RR's layer when it is the objective's (else scaled with depth)."""
        if retain_objective not in RETAIN_TERMS:
            raise ValueError(f"retain term must be one of {tuple(RETAIN_TERMS)}, got {retain_objective!r}")
        state = reference if reference is not None else ReferenceState()
        return self.measure(lambda m: objective_inputs.loss(retain_objective, m, retain_batch, state, layer=layer),
                            self._risks(forget_batch, retain_batch))

    def _device_types(self):
        return {p.device.type for p in self.model.parameters()}

    # -- inner products into groups ---------------------------------------------------------------------
    def _results(self, grads: dict, products_of: dict, losses: dict, per_instance: bool, head_entry=None,
                 streamed=None) -> GEffectResult:
        """A result per entry of ``products_of`` ({result: (key of its first gradient, [risk keys])}); the
        first is returned, the others are attached to it under their names (``retain_term``). ``streamed``:
        the products taken during the backward (`StreamedProducts`)."""
        with products.exact_arithmetic(self._device_types()):
            if streamed is not None:
                per_sample = streamed.per_sample
            else:
                per_sample = {OBJECTIVE: _batch_size(grads[OBJECTIVE])} if per_instance else {}
            values, plan = self._inner_products(grads, pairs_of(products_of), per_sample, head_entry, streamed)
        values = products.on_host(values)
        results = {}
        for result_name, (a, risks) in products_of.items():
            total, by_group, instance = {}, {}, {}
            for risk in risks:
                group_sums = {}
                n = per_sample.get(a, 0)
                instance[risk] = torch.zeros(n, dtype=torch.float64)
                for name, (value, samples) in values[(a, risk)].items():
                    group_sums[self.groups[name]] = group_sums.get(self.groups[name], 0.0) + value
                    if samples is not None and n:
                        instance[risk] += samples
                for group, value in group_sums.items():
                    by_group.setdefault(group, {})[risk] = value
                total[risk] = sum(group_sums.values())
                if not math.isfinite(total[risk]):  # finite losses, yet a gradient holds NaN or inf
                    raise ValueError(f"the G-effect of the {result_name} on risk {risk!r} is {total[risk]}: a "
                                     f"gradient holds NaN or inf at these parameters")
                instance[risk] = instance[risk].tolist()
            loss_values = losses if a == OBJECTIVE else {"objective": losses[a]}
            results[result_name] = GEffectResult(total, by_group, instance if a in per_sample else None,
                                                 loss_values, plan=plan if result_name == "objective" else None)
        result = results.pop("objective")
        result.retain_term = results.pop("retain_term", None)
        if self.explain:
            print(result.explain())
        return result

    def _inner_products(self, grads, pairs, per_sample, head_entry, streamed=None):
        """{(a, risk): {parameter: (value, per-sample values or None)}} and the plan, parameter by parameter."""
        values = {pair: {} for pair in pairs}
        plan = [head_entry] if head_entry is not None else []
        for name, param in self._params().items():  # every profiled parameter, 0 where no gradient reaches
            if streamed is not None and name in streamed.values:
                plan.append(streamed.entries[name])
                for pair, value in streamed.values[name].items():
                    values[pair][name] = value
                continue
            parts = {key: _parts(grads[key], name) for key in dict.fromkeys(k for pair in pairs for k in pair)}
            entry = products.plan_parameter(name, self.groups[name], parts, pairs, param.numel(),
                                            per_sample, head_entry)
            plan.append(entry)
            for pair, value in products.parameter_products(entry, parts, pairs, param.shape, per_sample).items():
                values[pair][name] = value
        return values, plan


def _refuse_per_instance_when_sharded(per_instance):
    if per_instance:
        raise NotImplementedError("per_instance=True is not available on a sharded (FSDP2) model")


def _batch_size(grad: FactoredGradient) -> int:
    """The number of samples the objective's rows split into (every use's rows are [batch, ...])."""
    if grad.dense:
        raise ValueError("per_instance=True needs every parameter's objective gradient in factored form, but "
                         f"{', '.join(grad.dense)} are used outside the hooked layers (Linear, Conv1D, Embedding, "
                         "affine norms; e.g. by a fused loss: call the model's forward in the objective or use "
                         "measure_unlearning) or their layer's output is modified in place")
    shapes = [shape for shapes in grad.rows_shapes.values() for shape in shapes]
    sizes = {shape[0] for shape in shapes}
    if len(sizes) != 1 or any(len(shape) < 2 for shape in shapes):
        raise ValueError("per_instance=True needs [batch, ...] inputs of one batch size in every layer; found "
                         f"row shapes {sorted(set(shapes))}")
    return sizes.pop()


def _parts(grad: FactoredGradient, name):
    """Parameter ``name``'s gradient as a list of parts that sum to it: a dense tensor and/or uses."""
    return ([grad.dense[name]] if name in grad.dense else []) + grad.uses.get(name, [])


def _refuse_reentrant_checkpointing(model):
    """ValueError when ``model`` would run reentrant gradient checkpointing (a Hugging Face module with it enabled,
    in training mode): its blocks' backward runs inside a second backward the profiler's gradients cannot reach."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and module.training and \
                getattr(func, "keywords", {}).get("use_reentrant") is True:
            raise ValueError("the model runs reentrant gradient checkpointing, which G-effects cannot be measured "
                             "through: enable it non-reentrant, model.gradient_checkpointing_enable("
                             "gradient_checkpointing_kwargs={'use_reentrant': False}) (the Hugging Face default), "
                             "or measure in eval mode")
