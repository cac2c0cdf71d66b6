"""The profiler's Gram form without the C++ kernel, as on a GPU without the CUDA extension or a machine without a
compiler: where the extension builds (as in CI) that torch path would otherwise never run."""
import pytest
import torch

from geffect_kernels import hf
from geffect_kernels.backends.cpp import ghost
from geffect_kernels.geffect import GEffectProfiler, inner, products

from geffect_models import batch, tiny_model
from test_geffect_profiler import assert_matches, hf_loss


@pytest.fixture
def torch_gram(monkeypatch):
    """The Gram kernel reported unavailable, and Gram tiles of a few rows; records each time the form is taken."""
    asked = []
    monkeypatch.setattr(inner, "_ghost_kernel", lambda device: asked.append(device) or None)
    monkeypatch.setattr(ghost, "TORCH_TILE_ELEMENTS", 64)
    return asked


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_torch_gram_form_matches_the_definition_per_parameter(torch_gram, kind):
    model = tiny_model(kind)
    forget, retain = batch(seed=1, prompt=2), batch(batch_size=2, length=9, seed=2, pad_first=False)
    objective = hf_loss(forget, -1.0)
    risks = {"forget": hf_loss(forget), "retain": hf_loss(retain)}
    result = GEffectProfiler(model, groups="parameter").measure(objective, risks)
    assert torch_gram, "no layer took the Gram form: the torch fallback did not run"
    assert_matches(result, model, objective, risks, "parameter", 1e-9, 1e-12)


def test_torch_gram_form_per_instance_equals_the_kernels(monkeypatch):
    if inner._ghost_kernel(torch.device("cpu")) is None:
        pytest.skip("the C++ Gram kernel is not built here")
    # The cost model takes the projection form for these tiny layers: force the Gram form where possible.
    monkeypatch.setattr(products, "choose", lambda costs: "gram" if costs.get("gram", float("inf")) < float("inf")
                        else min(costs, key=costs.get))
    model = tiny_model("llama")
    forget, retain = batch(seed=7, prompt=2), batch(batch_size=2, length=6, seed=8, pad_first=False)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    measure = lambda: GEffectProfiler(model, groups="layer").measure_unlearning(  # noqa: E731
        "npo", forget, retain, ref_logprobs=ref, per_instance=True)
    with_kernel = measure()
    asked = []
    monkeypatch.setattr(inner, "_ghost_kernel", lambda device: asked.append(device) or None)
    without = measure()
    assert asked, "no layer took the Gram form: the torch fallback did not run"
    for risk in ("forget", "retain"):
        assert without.per_instance[risk] == pytest.approx(with_kernel.per_instance[risk], rel=1e-10)
        for group, values in with_kernel.by_group.items():
            assert without.by_group[group][risk] == pytest.approx(values[risk], rel=1e-10, abs=1e-15)
