"""The Hugging Face helper on tiny random models built from configs: equal to the model's own loss."""
import pytest
import torch
import transformers

import geffect_kernels as gk
from geffect_kernels import hf


def tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                                                    n_positions=64))
    if kind == "gemma2":  # final-logit soft-capping
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0))
    if kind == "qwen2-biased-head":  # an untied head with a bias, to exercise the bias path
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, num_key_value_heads=2))
        model.lm_head = torch.nn.Linear(32, 97, bias=True)
        return model
    raise ValueError(kind)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # a prompt that does not count
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "qwen2-biased-head"])
def test_nll_equals_model_loss(kind):
    model = tiny(kind).double().eval()  # no dropout: both passes must see the same network
    data = batch()
    out = model(**data)
    # transformers computes its loss on float32-cast logits: equal to that within float32 rounding ...
    assert abs(hf.unlearning_loss("nll", model, data).item() - out.loss.item()) <= 1e-6 * out.loss.item()
    # ... and to the same cross-entropy in float64 to the last digits, gradients included
    vocab = out.logits.shape[-1]
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab),
                                                 data["labels"][:, 1:].reshape(-1), ignore_index=-100)
    params = [p for p in model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected, params)
    got = hf.unlearning_loss("nll", model, data)
    assert abs(got.item() - expected.item()) <= 1e-12 * abs(expected.item())
    for g_got, g_exp in zip(torch.autograd.grad(got, params), expected_grads):
        assert torch.allclose(g_got, g_exp, rtol=1e-9, atol=1e-12)


def test_head_and_tied_embeddings():
    model = tiny("gpt2")
    head = hf.lm_head(model)
    assert head.weight is model.get_input_embeddings().weight  # tied: one parameter
    assert hf.lm_head(tiny("gemma2")).softcap == 3.0
    assert hf.lm_head(tiny("qwen2-biased-head")).bias is not None


def test_token_logprobs_and_objectives_on_a_model():
    model = tiny("llama")
    data = batch()
    with torch.no_grad():
        ref = hf.token_logprobs(model, data)
        logits = model(**data).logits
    assert ref.shape == (3, 10)
    expected = gk.token_logprobs_from_logits(logits, data["labels"], shift=True, backend="oracle")
    assert torch.allclose(ref, expected, atol=1e-5)
    for name in [n for n, o in gk.OBJECTIVES.items() if o.inputs == "logprobs"]:
        loss = hf.unlearning_loss(name, model, data, ref_logprobs=ref - 0.1)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["gemma2", "qwen2-biased-head"])
def test_token_stats_on_a_model(kind):
    """hf.token_stats equals the statistics of the model's own (soft-capped, biased) logits, in float64."""
    model = tiny(kind).double().eval()
    data = batch()
    got = hf.token_stats(model, data)
    assert got.entropy.shape == (3, 10) and not got.entropy.requires_grad
    with torch.no_grad():
        log_p = torch.log_softmax(model(**data).logits[:, :-1], -1)
    labels = data["labels"][:, 1:]
    valid = labels != -100
    entropy = -(log_p.exp() * log_p).sum(-1)
    var = (log_p.exp() * (log_p + entropy.unsqueeze(-1)) ** 2).sum(-1)
    lp = log_p.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    for g, e in zip(got, (lp, entropy, var)):
        assert torch.allclose(g, torch.where(valid, e, 0), rtol=1e-12, atol=1e-14)


def test_labels_default_to_inputs_without_padding():
    data = batch()
    labels = hf.batch_labels({"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]})
    assert torch.equal(labels[1, 8:], torch.full((3,), -100))
    assert torch.equal(labels[0], data["input_ids"][0])


def test_not_a_causal_lm():
    with pytest.raises(ValueError, match="output embedding"):
        hf.lm_head(torch.nn.Linear(3, 3))
