"""peft LoRA models: the hf helpers see the decoder under the PeftModel, and the profiler's G-effects (over
the trainable parameters only) equal the materialized definition in float64."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.capture import Capture
from geffect_kernels.geffect.groups import parameter_groups

from geffect_models import batch, materialized, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(targets=("q_proj", "v_proj"), modules_to_save=None, seed=0):
    # init_lora_weights=False: B ≠ 0, so A's gradient is not identically zero and the test can fail
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=modules_to_save,
                        init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(seed)
    return get_peft_model(tiny_model("llama", seed=seed), config).double().eval()


def test_losses_see_the_decoder_under_the_peft_model():
    model = lora_model()
    forget = batch(seed=3)
    loss = hf.unlearning_loss("nll", model, forget)
    expected = torch.nn.functional.cross_entropy(model(input_ids=forget["input_ids"],
                                                       attention_mask=forget["attention_mask"]).logits[:, :-1]
                                                 .transpose(1, 2), forget["labels"][:, 1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("targets, save", [(("q_proj", "v_proj"), None),
                                           (("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"), ["lm_head"])])
@pytest.mark.parametrize("objective", ["npo", "ga"])
def test_geffects_equal_materialized_over_trainable_parameters(targets, save, objective):
    model = lora_model(targets, save)
    forget, retain = batch(seed=1, prompt=2), batch(batch_size=2, length=9, seed=2, pad_first=False)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    result = GEffectProfiler(model, groups="component").measure_unlearning(objective, forget, retain,
                                                                           ref_logprobs=ref)
    names = parameter_groups(model, "component")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    objective_fn = lambda m: hf.unlearning_loss(objective, m, forget, ref_logprobs=ref)
    # NPO reuses the forget NLL's backward scaled per sample; HF's Llama RMSNorm computes in float32 even in a
    # float64 model, so the two routes round differently there (the shortcut itself is exact)
    rel = 1e-5 if objective == "npo" else 1e-9
    for risk, data in (("forget", forget), ("retain", retain)):
        expected = materialized(model, objective_fn, lambda m: hf.unlearning_loss("nll", m, data), names)
        assert set(result.by_group) == set(expected) == {names[n] for n in trainable}
        for group, (dot, scale) in expected.items():
            assert result.by_group[group][risk] == pytest.approx(dot, rel=rel, abs=1e-12 * scale), (risk, group)
    # groups still name the layers (and the head when it is trained)
    assert {g.split(".")[1] for g in result.by_group if g.startswith("layer.")} == {"0", "1"}
    assert ("head" in result.by_group) == bool(save)


def test_frozen_base_weights_are_not_captured():
    model = lora_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    captured = [m for m, _ in Capture(model, params)._modules]
    assert captured and all(p.requires_grad for m in captured for p in m.parameters(recurse=False))
    assert len(captured) == 2 * 2 * 2  # lora_A and lora_B of q_proj and v_proj in two layers
