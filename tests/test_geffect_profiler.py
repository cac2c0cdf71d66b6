"""GEffectProfiler against the materialized definition (flatten both full gradients, dot) on tiny HF models."""
import pytest
import torch

from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.groups import parameter_groups

from geffect_models import batch, materialized, tiny_model

MODELS = ["llama", "qwen2", "gpt2"]


def hf_loss(b, sign=1.0, sample=None):
    """sign × the batch's mean NLL through the model's own forward and logits, in the model's dtype
    (HF's ``.loss`` upcasts to float32); restricted to sample ``sample``'s tokens when given."""
    def fn(m):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        keep = labels != -100
        if sample is not None:
            keep = keep & (torch.arange(labels.shape[0])[:, None] == sample)
        return sign * (nll * keep).sum() / (labels != -100).sum()
    return fn


def assert_matches(result, model, objective, risks, groups, rtol, norm_tol):
    """Each group within rtol of the definition, or norm_tol of ‖∇a‖‖∇b‖ where the dot product cancels."""
    names = parameter_groups(model, groups)
    for risk, fn in risks.items():
        expected = materialized(model, objective, fn, names)
        assert set(result.by_group) == set(expected)
        for group, (dot, scale) in expected.items():
            got = result.by_group[group][risk]
            assert abs(got - dot) <= rtol * abs(dot) + norm_tol * scale, (risk, group, got, dot, scale)
        total = sum(dot for dot, _ in expected.values())
        assert result.total[risk] == pytest.approx(total, rel=rtol, abs=norm_tol * sum(s for _, s in expected.values()))
        assert sum(v[risk] for v in result.by_group.values()) == pytest.approx(result.total[risk], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kind", MODELS)
def test_every_parameter_matches_definition_float64(kind):
    model = tiny_model(kind)
    forget, retain = batch(seed=1, prompt=2), batch(batch_size=2, length=9, seed=2, pad_first=False)
    objective = hf_loss(forget, -1.0)  # gradient ascent through the model's own forward
    risks = {"forget": hf_loss(forget), "retain": hf_loss(retain)}
    result = GEffectProfiler(model, groups="parameter").measure(objective, risks)
    assert_matches(result, model, objective, risks, "parameter", 1e-9, 1e-12)
    assert result.total["forget"] < 0  # GA raises the forget NLL: e_u = −‖∇NLL‖² < 0


@pytest.mark.parametrize("kind", MODELS)
def test_components_match_definition_float32(kind):
    model = tiny_model(kind, torch.float32)
    forget, retain = batch(seed=3), batch(seed=4, pad_first=False)
    objective = hf_loss(forget, -1.0)
    risks = {"retain": hf_loss(retain)}
    result = GEffectProfiler(model, groups="component").measure(objective, risks)
    assert_matches(result, model, objective, risks, "component", 1e-5, 1e-6)


def test_layer_groups_name_the_blocks():
    for kind, expected in [("llama", ["embedding", "layer.0", "layer.1", "final_norm", "head"]),
                           ("gpt2", ["embedding", "layer.0", "layer.1", "final_norm"])]:  # GPT-2: head tied
        model = tiny_model(kind)
        assert list(dict.fromkeys(parameter_groups(model, "layer").values())) == expected
    model = tiny_model("llama")
    components = set(parameter_groups(model, "component").values())
    assert {"layer.0.self_attn.q_proj", "layer.1.mlp.down_proj", "layer.0.input_layernorm"} <= components
    by_kind = parameter_groups(model, lambda name: "attention" if "self_attn" in name else "rest")
    assert set(by_kind.values()) == {"attention", "rest"}
    with pytest.raises(ValueError, match="groups must be"):
        GEffectProfiler(model, groups="layers")


@pytest.mark.parametrize("kind", MODELS)
def test_per_instance_is_each_samples_gradient(kind):
    model = tiny_model(kind)
    forget, retain = batch(batch_size=3, seed=5), batch(seed=6)
    risk = hf_loss(retain)

    result = GEffectProfiler(model).measure(hf_loss(forget), {"retain": risk}, per_instance=True)
    names = {n: "all" for n, _ in model.named_parameters()}
    for i, value in enumerate(result.per_instance["retain"]):
        (dot, scale), = materialized(model, hf_loss(forget, sample=i), risk, names).values()
        assert value == pytest.approx(dot, rel=1e-9, abs=1e-12 * scale)
    assert sum(result.per_instance["retain"]) == pytest.approx(result.total["retain"], rel=1e-12)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("objective", ["ga", "npo", "wtnpo", "simnpo"])
def test_fast_path_equals_generic_path(kind, objective):
    model = tiny_model(kind)
    forget, retain = batch(seed=7, prompt=2), batch(batch_size=2, length=6, seed=8, pad_first=False)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    profiler = GEffectProfiler(model, groups="layer")
    fast = profiler.measure_unlearning(objective, forget, retain, ref_logprobs=ref, per_instance=True)
    generic = profiler.measure(lambda m: hf.unlearning_loss(objective, m, forget, ref_logprobs=ref),
                               {"forget": lambda m: hf.unlearning_loss("nll", m, forget),
                                "retain": lambda m: hf.unlearning_loss("nll", m, retain)})
    dense_head = profiler.measure_unlearning(objective, forget, retain, ref_logprobs=ref)  # head not split by rows
    names = parameter_groups(model, "layer")
    for risk in ("forget", "retain"):
        for group, values in generic.by_group.items():
            assert fast.by_group[group][risk] == pytest.approx(values[risk], rel=1e-9, abs=1e-14)
            assert dense_head.by_group[group][risk] == pytest.approx(values[risk], rel=1e-9, abs=1e-14)
        assert sum(fast.per_instance[risk]) == pytest.approx(fast.total[risk], rel=1e-9)
        assert len(fast.per_instance[risk]) == 3
    assert fast.losses["forget"] == pytest.approx(float(hf.unlearning_loss("nll", model, forget).detach()), rel=1e-12)
    # The nll retain term's own G-effects, from the same gradients: ‖∇R_r‖² and ∇R_rᵀ∇R_u.
    expected = materialized(model, lambda m: hf.unlearning_loss("nll", m, retain),
                            lambda m: hf.unlearning_loss("nll", m, forget), names)
    assert fast.retain_term.total["forget"] == pytest.approx(sum(d for d, _ in expected.values()), rel=1e-9)
    assert fast.retain_term.total["retain"] > 0


def test_fast_path_per_instance_matches_generic_per_instance():
    model = tiny_model("gpt2")
    forget, retain = batch(seed=9), batch(seed=10)
    fast = GEffectProfiler(model).measure_unlearning("ga", forget, retain, per_instance=True)
    generic = GEffectProfiler(model).measure(hf_loss(forget, -1.0), {"forget": hf_loss(forget),
                                                                     "retain": hf_loss(retain)}, per_instance=True)
    for risk in ("forget", "retain"):
        assert fast.per_instance[risk] == pytest.approx(generic.per_instance[risk], rel=1e-9)


def test_uses_outside_hooked_layers_fall_back_to_dense_gradients():
    """A fused loss uses the head weight directly: still exact, but no per-instance split for it."""
    model = tiny_model("llama")
    forget = batch(seed=11)
    objective = lambda m: hf.unlearning_loss("ga", m, forget)
    risks = {"forget": lambda m: hf.unlearning_loss("nll", m, forget)}
    result = GEffectProfiler(model, groups="parameter").measure(objective, risks)
    assert_matches(result, model, objective, risks, "parameter", 1e-9, 1e-12)
    with pytest.raises(ValueError, match="lm_head.weight"):
        GEffectProfiler(model).measure(objective, risks, per_instance=True)


def test_model_left_as_found():
    model = tiny_model("gpt2")
    model.transformer.h[0].requires_grad_(False)  # frozen parameters are not profiled
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forget, retain = batch(seed=12), batch(seed=13)
    profiler = GEffectProfiler(model)
    result = profiler.measure_unlearning("npo", forget, retain, ref_logprobs=hf.token_logprobs(model, forget).detach(),
                                         per_instance=True)
    profiler.measure(hf_loss(forget, -1.0), {"r": hf_loss(retain)}, per_instance=True)
    assert "layer.0" not in result.by_group and "layer.1" in result.by_group
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_input_errors():
    model = tiny_model("llama")
    profiler = GEffectProfiler(model)
    forget = batch()
    with pytest.raises(ValueError, match="unknown objective"):
        profiler.measure_unlearning("gaa", forget, forget)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        profiler.measure_unlearning("npo", forget, forget)
    with pytest.raises(ValueError, match="retain_objective"):
        profiler.measure_unlearning("ga", forget, forget, retain_objective="ce")
    with pytest.raises(ValueError, match="input_ids"):
        profiler.measure_unlearning("ga", {"ids": forget["input_ids"]}, forget)
    with pytest.raises(ValueError, match="scalar tensor"):
        profiler.measure(lambda m: 1.0, {"r": hf_loss(forget)})
    with pytest.raises(TypeError, match="non-empty dict"):
        profiler.measure(hf_loss(forget), {})
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        profiler.measure(hf_loss(forget), {"r": hf_loss(forget)})


def test_inside_autocast_matches_outside():
    """The training loop profiles under autocast: captures come in mixed dtypes, inner products stay exact."""
    model = tiny_model("llama", torch.float32)
    forget, retain = batch(seed=14), batch(seed=15)
    profiler = GEffectProfiler(model)
    plain = profiler.measure_unlearning("ga", forget, retain, per_instance=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = profiler.measure_unlearning("ga", forget, retain, per_instance=True)
        generic = profiler.measure(hf_loss(forget, -1.0), {"retain": hf_loss(retain)})
        (dot, scale), = materialized(model, hf_loss(forget, -1.0), hf_loss(retain),
                                     {n: "all" for n, _ in model.named_parameters()}).values()
    assert abs(generic.total["retain"] - dot) <= 1e-2 * scale  # same bf16 graph: bf16-level agreement
    for risk in ("forget", "retain"):
        assert mixed.total[risk] == pytest.approx(plain.total[risk], rel=5e-2)


def test_official_eps_reaches_the_profiler():
    """measure_unlearning with TNPO's eps equals the generic path on the same loss, and eps changes the value."""
    model = tiny_model("llama")
    forget, retain = batch(seed=9, prompt=2), batch(batch_size=2, length=6, seed=10, pad_first=False)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    profiler = GEffectProfiler(model)
    fast = profiler.measure_unlearning("tnpo", forget, retain, ref_logprobs=ref, eps=1e-3)
    generic = profiler.measure(lambda m: hf.unlearning_loss("tnpo", m, forget, ref_logprobs=ref, eps=1e-3),
                               {"forget": lambda m: hf.unlearning_loss("nll", m, forget),
                                "retain": lambda m: hf.unlearning_loss("nll", m, retain)})
    exact = profiler.measure_unlearning("tnpo", forget, retain, ref_logprobs=ref)
    for risk in ("forget", "retain"):
        assert fast.total[risk] == pytest.approx(generic.total[risk], rel=1e-9)
        assert abs(fast.total[risk] - exact.total[risk]) > 1e-3 * abs(exact.total[risk])
