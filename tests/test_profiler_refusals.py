"""The profiler reports no G-effect it cannot stand behind: a NaN or inf loss (also one from NaN reference
log-probabilities given without ``check_values``) and a gradient holding NaN are refused in one line."""
import pytest
import torch

from geffect_kernels import GEffectProfiler, hf
from geffect_models import batch, nll, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_nan_loss_or_gradient_in_measure_is_refused():
    model = tiny_model("llama")
    profiler = GEffectProfiler(model)
    forget = batch()
    with pytest.raises(ValueError, match=r"the objective is nan at these parameters: no G-effect to measure"):
        profiler.measure(lambda m: nll(forget)(m) * float("nan"), {"forget": nll(forget)})
    with pytest.raises(ValueError, match=r"the risk 'forget' is inf at these parameters"):
        profiler.measure(nll(forget), {"forget": lambda m: nll(forget)(m) + float("inf")})
    weight = hf.lm_head(model).weight

    def finite_value_nan_gradient(m):  # sqrt at 0: the value is finite, the gradient 0 · inf
        return nll(forget)(m) + torch.sqrt(((weight - weight.detach()) ** 2).sum())

    with pytest.raises(ValueError, match=r"G-effect of the objective on risk 'forget' is nan: a gradient holds NaN"):
        profiler.measure(finite_value_nan_gradient, {"forget": nll(forget)})
    assert profiler.measure(nll(forget), {"forget": nll(forget)}).total["forget"] > 0  # still measures


@pytest.mark.parametrize("objective", ["npo", "tnpo", "wtnpo"])
def test_nan_reference_logprobs_are_refused_without_check_values(objective):
    model = tiny_model("llama")
    forget, retain = batch(), batch(seed=2)
    with torch.no_grad():
        ref = hf.token_logprobs(model, forget)
    ref[1, 3] = float("nan")  # one answer token of the second sample
    with pytest.raises(ValueError, match=r"'objective': nan.*no G-effect to measure"):
        GEffectProfiler(model).measure_unlearning(objective, forget, retain, ref_logprobs=ref)


@pytest.mark.parametrize("lora", [False, True])
def test_reentrant_gradient_checkpointing_is_refused_in_one_line(lora):
    from geffect_kernels.train.lora import add_lora

    model = tiny_model("llama")
    if lora:
        model = add_lora(model, r=2, targets=["q_proj", "v_proj"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(ValueError, match=r"reentrant gradient checkpointing.*use_reentrant': False"):
        GEffectProfiler(model).measure_unlearning("ga", batch(), batch(seed=2))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = GEffectProfiler(model).measure_unlearning("ga", batch(), batch(seed=2))
    model.gradient_checkpointing_disable()
    plain = GEffectProfiler(model).measure_unlearning("ga", batch(), batch(seed=2))
    assert checkpointed.total == pytest.approx(plain.total, rel=1e-10)
