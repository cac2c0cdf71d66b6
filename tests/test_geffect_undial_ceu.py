"""G-effects of CE-U and UNDIAL (`measure_unlearning`) against the materialized definition: both full gradients
flattened and dotted, the objective through the model's own forward and logits (tests/test_undial_ceu.py's
re-implementations of open-unlearning's functions), per layer, in float64."""
import pytest
import torch

from formulas import label_shifted_cross_entropy
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.groups import parameter_groups
from geffect_kernels.objective_inputs import ReferenceState

from geffect_models import batch, materialized, tiny_model
from test_undial_ceu import open_unlearning_ceu


def model_nll(b):
    """The batch's mean NLL through the model's own forward and logits."""
    def fn(m):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return (nll * (labels != -100)).sum() / (labels != -100).sum()
    return fn


def assert_matches_definition(result, model, objective, risks):
    names = parameter_groups(model, "layer")
    for risk, fn in risks.items():
        expected = materialized(model, objective, fn, names)
        for group, (dot, scale) in expected.items():
            assert result.by_group[group][risk] == pytest.approx(dot, rel=1e-9, abs=1e-12 * scale), (risk, group)
        assert result.total[risk] == pytest.approx(sum(d for d, _ in expected.values()), rel=1e-9)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ceu_geffects_are_the_materialized_ones(kind):
    model = tiny_model(kind)
    forget, retain = batch(seed=11, prompt=2), batch(batch_size=2, length=6, seed=12, pad_first=False)
    result = GEffectProfiler(model, groups="layer").measure_unlearning("ceu", forget, retain, per_instance=True)

    def objective(m):
        return open_unlearning_ceu(m(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits,
                                   forget["labels"])

    assert_matches_definition(result, model, objective, {"forget": model_nll(forget), "retain": model_nll(retain)})
    assert sum(result.per_instance["forget"]) == pytest.approx(result.total["forget"], rel=1e-9)
    assert result.total["forget"] < 0  # CE-U lowers the labels' likelihood: the forget NLL rises


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_undial_geffects_are_the_materialized_ones(kind):
    model, reference = tiny_model(kind), tiny_model(kind, seed=5)
    forget, retain = batch(seed=13, prompt=2), batch(batch_size=2, length=6, seed=14, pad_first=False)
    result = GEffectProfiler(model, groups="layer").measure_unlearning(
        "undial", forget, retain, reference=ReferenceState(model=reference), beta=3.0)

    def objective(m):
        inputs = dict(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"])
        with torch.no_grad():
            teacher = reference(**inputs).logits[:, :-1]
        labels = forget["labels"][:, 1:]
        per = label_shifted_cross_entropy(m(**inputs).logits[:, :-1], teacher, labels, 3.0)
        return per.sum() / (labels != -100).sum()

    assert_matches_definition(result, model, objective, {"forget": model_nll(forget), "retain": model_nll(retain)})
    assert result.losses["objective"] == pytest.approx(float(objective(model).detach()), rel=1e-12)
