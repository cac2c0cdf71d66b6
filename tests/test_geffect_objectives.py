"""measure_unlearning on PO, DPO, RMU and the KL and RR retain terms against the materialized definition (flatten
both full gradients, dot), per parameter, in float64 on tiny HF models."""
import copy

import pytest
import torch

from geffect_kernels import hf
from geffect_kernels.catalog import resolve
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.objective_inputs import ReferenceState, loss, side, with_alternate

from geffect_models import batch, materialized, nll, tiny_model


def _setup(kind):
    """A model moved away from its starting copy (KL and RR then have gradients), forget batches with substitute
    answers, a retain batch and the ReferenceState of all of them."""
    model = tiny_model(kind)
    start = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    forget = with_alternate(batch(seed=1, prompt=2), batch(length=6, seed=7, prompt=2))
    retain = batch(batch_size=2, length=9, seed=2, pad_first=False)
    with torch.no_grad():
        state = ReferenceState(hf.token_logprobs(start, side(forget, "forget")),
                               hf.token_logprobs(start, side(forget, "alternate")), start, seed=3)
    return model, forget, retain, state


def _assert_per_parameter(model, result, objective, forget, retain):
    names = {n: n for n, _ in model.named_parameters()}
    for risk, b in (("forget", side(forget, "forget")), ("retain", retain)):
        for name, (dot, scale) in materialized(model, objective, nll(b), names).items():
            assert abs(result.by_group[name][risk] - dot) <= 1e-9 * abs(dot) + 1e-12 * scale, (risk, name)


@pytest.mark.parametrize("kind,name,hparams", [
    ("llama", "po", {}), ("gpt2", "po", {}), ("llama", "dpo", {"beta": 0.5}), ("qwen2", "dpo", {}),
    ("llama", "rmu", {}), ("gpt2", "rmu", {"layer": 1, "coeff": 2.0})])
def test_new_objectives_match_the_definition(kind, name, hparams):
    model, forget, retain, state = _setup(kind)
    profiler = GEffectProfiler(model, groups="parameter")
    result = profiler.measure_unlearning(name, forget, retain, reference=state, retain_objective="none", **hparams)
    objective = resolve(name, hparams)
    _assert_per_parameter(model, result, lambda m: loss(objective, m, forget, state), forget, retain)
    assert result.losses["objective"] == pytest.approx(float(loss(objective, model, forget, state).detach()),
                                                              rel=1e-12)
    if name == "rmu":  # nothing above the steered layer gets a gradient
        top = f"{'model.layers' if kind != 'gpt2' else 'transformer.h'}.{1 if 'layer' not in hparams else 2}."
        assert all(v["forget"] == 0 for n, v in result.by_group.items() if n.startswith(top))


@pytest.mark.parametrize("retain_objective,objective", [("kl", "ga"), ("rr", "npo"), ("rr", "rmu"), ("kl", "po"),
                                                         ("nll", "dpo")])
def test_retain_terms_match_the_definition(retain_objective, objective):
    model, forget, retain, state = _setup("llama")
    profiler = GEffectProfiler(model, groups="parameter")
    hparams = {"layer": 1} if objective == "rmu" else {}
    result = profiler.measure_unlearning(objective, forget, retain, reference=state, retain_objective=retain_objective,
                                         **hparams)
    term = lambda m: loss(retain_objective, m, retain, state, layer=hparams.get("layer"))
    _assert_per_parameter(model, result.retain_term, term, forget, retain)
    if retain_objective == "rr":  # the objective's layer, else the default (layer 0 of 2: layer 1 untouched)
        touched = {n for n, v in result.retain_term.by_group.items() if v["retain"] != 0}
        assert any(n.startswith("model.layers.1.") for n in touched) == (objective == "rmu")


def test_retain_term_at_the_starting_model_is_zero_and_the_reference_is_required():
    model = tiny_model("llama")
    retain = batch(batch_size=2, length=9, seed=2, pad_first=False)
    profiler = GEffectProfiler(model)
    for term in ("kl", "rr"):
        result = profiler.measure_retain_term(term, batch(seed=1), retain, ReferenceState(model=copy.deepcopy(model)))
        assert abs(result.total["retain"]) < 1e-20 and abs(result.total["forget"]) < 1e-20
        with pytest.raises(ValueError, match="starting model"):
            profiler.measure_unlearning("ga", batch(seed=1), retain, retain_objective=term)
    with pytest.raises(ValueError, match="substitute answers"):
        profiler.measure_unlearning("po", batch(seed=1), retain)
