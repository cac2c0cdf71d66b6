"""Gradient checkpointing in the loop: non-reentrant, so LoRA adapters train (every lora_B leaves zero, which the
reentrant checkpoint without input gradients does not do), and metrics and G-effects equal a run without it."""
import pytest
import torch

from geffect_kernels.train import TrainConfig, tiny_llama, train
from geffect_kernels.train import gradient_checkpointing
from geffect_kernels.train.lora import add_lora
from demo_cases import encoded_sets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return encoded_sets()


def lora_model(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, layers=3, heads=2, intermediate_size=48, seed=1).double()
    return add_lora(model, r=3, targets=["q_proj", "v_proj", "down_proj"], seed=2)


def config(**kw):
    return TrainConfig(**{"objective": "npo", "steps": 2, "batch_size": 3, "lr": 1e-2, "progress": False, **kw})


def lora_b(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}


def test_checkpointing_trains_every_lora_adapter(setup):
    tokenizer, forget, retain = setup
    model = lora_model(tokenizer)
    assert all(bool((b == 0).all()) for b in lora_b(model).values())  # peft starts every lora_B at zero
    calls = []
    layer = model.get_base_model().model.layers[1]
    layer.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))  # deep-copied to a reference
    train(model, forget, retain, config(gradient_checkpointing=True))
    # 2 steps × (forget, retain) forwards, each run again in the backward (the reference's passes run without
    # gradients)
    assert calls.count(True) == 8
    moved = lora_b(model)
    assert len(moved) == 9 and all(bool((b != 0).any()) for b in moved.values())
    assert not hasattr(model, "_require_grads_hook") and not model.get_base_model().is_gradient_checkpointing


def test_the_reentrant_checkpoint_without_input_gradients_leaves_lora_b_at_zero(setup, monkeypatch):
    # the failure the non-reentrant setting avoids: the same run with use_reentrant=True trains no adapter
    tokenizer, forget, retain = setup
    model = lora_model(tokenizer)
    monkeypatch.setitem(gradient_checkpointing.NON_REENTRANT, "use_reentrant", True)
    try:
        train(model, forget, retain, config(gradient_checkpointing=True))
    except RuntimeError as err:  # torch: the loss has no gradient to take
        assert "does not require grad" in str(err)
    assert all(bool((b == 0).all()) for b in lora_b(model).values())


@pytest.mark.parametrize("objective, retain_objective, lora", [("npo", "nll", True), ("wtnpo", "kl", False)])
def test_checkpointing_leaves_metrics_and_geffects_unchanged(setup, objective, retain_objective, lora):
    tokenizer, forget, retain = setup
    runs = []
    for checkpointing in (False, True):
        model = lora_model(tokenizer) if lora else tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2,
                                                              intermediate_size=48, seed=1).double()
        result = train(model, forget, retain, config(objective=objective, retain_objective=retain_objective,
                                                     geffect_every=1, gradient_checkpointing=checkpointing))
        runs.append((result, [p.detach().clone() for p in model.parameters()]))
    (plain, plain_params), (ckpt, ckpt_params) = runs
    for a, b in zip(plain.metrics, ckpt.metrics):
        for key in ("loss", "forget_loss", "retain_loss", "e_forget", "e_retain"):
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), key
    for a, b in zip(plain.geffects.results, ckpt.geffects.results):
        assert a.by_group.keys() == b.by_group.keys()
        for group, risks in a.by_group.items():
            for risk, value in risks.items():
                assert b.by_group[group][risk] == pytest.approx(value, rel=1e-9, abs=1e-12), (group, risk)
    for a, b in zip(plain_params, ckpt_params):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_checkpointing_setting_is_checked():
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        TrainConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="reference_device must be None"):
        TrainConfig(reference_device="cuda")
