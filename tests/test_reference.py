"""The reference without a second model: LoRA runs compare with the model's adapters disabled, reference
log-probabilities come from the starting model before the first update; metrics, G-effects and trained weights
equal those of the frozen deep copy the loop kept before (written out here), in float64."""
import copy

import pytest
import torch

from geffect_kernels import hf
from geffect_kernels.train import TrainConfig, tiny_llama
from geffect_kernels.train import frozen_model
from geffect_kernels.train.lora import add_lora
from geffect_kernels.train.loop import Run, run_steps
from demo_cases import encoded_sets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return encoded_sets()


class _PerBatchCache:
    """The former reference log-probabilities: a deep copy's, computed per forget batch as samples first appear."""

    def __init__(self, reference, data):
        self.reference, self.data, self.cache = reference, data, {}

    @torch.no_grad()
    def batch(self, indices, width, device):
        missing = sorted({i for i in indices if i not in self.cache})
        if missing:
            logprobs = hf.token_logprobs(self.reference, self.data.batch(missing), backend="auto").float()
            for row, i in enumerate(missing):
                self.cache[i] = logprobs[row, : len(self.data.examples[i]["input_ids"]) - 1]
        out = torch.zeros(len(indices), width - 1, device=device)
        for row, i in enumerate(indices):
            out[row, : len(self.cache[i])] = self.cache[i]
        return out


class CopiedReference(Run):
    """The former way: one frozen deep copy of the starting model for the KL term and the log-probabilities."""

    def load_reference(self):
        reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        needs_ref = self.config.objective in ("npo", "tnpo", "wtnpo")
        return ((reference if self.uses_reference_model else None),
                (_PerBatchCache(reference, self.forget) if needs_ref else None))


def model_of(tokenizer, lora):
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=48, seed=4).double()
    return add_lora(model, r=3, targets=["q_proj", "v_proj", "gate_proj"], seed=5) if lora else model


def run_with(run_type, tokenizer, forget, retain, lora, **settings):
    model = model_of(tokenizer, lora)
    config = TrainConfig(**{"steps": 3, "batch_size": 3, "grad_accum": 2, "lr": 5e-3, "progress": False,
                            "geffect_every": 2, **settings})
    run = run_type(model, forget, retain, config)
    run.resume(None)
    run_steps(run)
    return run, run.finish(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("lora, objective, retain_objective", [
    (True, "npo", "kl"), (False, "wtnpo", "kl"), (False, "tnpo", "nll"), (True, "ga", "kl"),
    (True, "ga", "rr"), (False, "npo", "rr")])  # rr: the layer's activations, LoRA's with the adapters disabled
def test_same_metrics_geffects_and_weights_as_a_copied_reference(setup, lora, objective, retain_objective):
    tokenizer, forget, retain = setup
    settings = dict(objective=objective, retain_objective=retain_objective)
    _, before, before_params = run_with(CopiedReference, tokenizer, forget, retain, lora, **settings)
    run, now, now_params = run_with(Run, tokenizer, forget, retain, lora, **settings)
    if retain_objective in ("kl", "rr"):
        expected = frozen_model.AdaptersDisabled if lora else frozen_model.FrozenCopy
        assert type(run.reference) is expected
    for a, b in zip(before.metrics, now.metrics):
        for key in ("loss", "forget_loss", "retain_loss", "grad_norm", "e_forget", "e_retain"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-13), (key, a["step"])
    for a, b in zip(before.geffects.results, now.geffects.results):
        for group, risks in a.by_group.items():
            for risk, value in risks.items():
                assert b.by_group[group][risk] == pytest.approx(value, rel=1e-9, abs=1e-13)
    for a, b in zip(before_params, now_params):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert before.metrics[-1]["retain_loss"] != 0  # the model moved away from its reference


def test_no_copy_of_the_model_unless_full_fine_tuning_has_a_kl_term(setup, monkeypatch):
    tokenizer, forget, retain = setup
    copies = []
    original = frozen_model.frozen_copy
    monkeypatch.setattr(frozen_model, "frozen_copy", lambda *a, **k: copies.append(1) or original(*a, **k))
    for lora, objective, retain_objective in [(True, "npo", "kl"), (False, "npo", "nll"), (False, "wtnpo", "none")]:
        config = TrainConfig(objective=objective, retain_objective=retain_objective, batch_size=2, progress=False)
        run = Run(model_of(tokenizer, lora), forget, retain, config)
        assert run.ref_cache is None or all(row.device.type == "cpu" for row in run.ref_cache.rows)
    assert copies == []
    Run(model_of(tokenizer, False), forget, retain, TrainConfig(retain_objective="kl", progress=False))
    assert copies == [1]


def test_frozen_copy_on_another_device_is_separate_frozen_and_keeps_ties(setup):
    tokenizer, _, _ = setup
    model = tiny_llama(tokenizer, hidden_size=16, layers=1, heads=2, intermediate_size=24).double()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    reference = frozen_model.frozen_copy(model, "cpu")
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and not b.requires_grad, name
    assert not reference.training


def test_reference_device_is_checked():
    with pytest.raises(ValueError, match="reference_device"):
        TrainConfig(reference_device="gpu")
