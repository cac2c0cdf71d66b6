"""Tiny random HF causal LMs, the materialized G-effect (flatten both gradients, dot) and the checks against it."""
import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from geffect_kernels import hf
from geffect_kernels import unlearning_loss_from_logprobs
from geffect_kernels.geffect import products

VOCAB = 61


def tiny_model(kind, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             pad_token_id=0, **overrides))
    elif kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=40,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             **overrides))
    elif kind == "gpt2":  # Conv1D, biases everywhere, LayerNorm, tied embeddings, position embeddings
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=1, eos_token_id=1, **overrides))
    elif kind == "gemma2":  # embedding scaled inside its forward, tied to the head; final-logit soft-cap
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=40,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, final_logit_softcapping=3.0, pad_token_id=0,
                                               **overrides))
    else:
        raise ValueError(kind)
    # Random norms too, so that no parameter's gradient has a special structure.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def batch(batch_size=3, length=7, seed=1, pad_first=True, prompt=0):
    """Random ids; the first sample right-padded by 2 (when asked), the first ``prompt`` labels ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_first:
        mask[0, -2:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_gradient(model, loss_fn):
    """{name: gradient} over the parameters that require grad (zeros where unused)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model), [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def materialized(model, objective, risk, groups):
    """{group: (∇objectiveᵀ∇risk over its parameters, ‖∇objective‖·‖∇risk‖ over them)} in float64."""
    ga, gb = full_gradient(model, objective), full_gradient(model, risk)
    out = {}
    for name in ga:
        group = groups[name]
        dot, na, nb = out.get(group, (0.0, 0.0, 0.0))
        a, b = ga[name].double(), gb[name].double()
        out[group] = (dot + float((a * b).sum()), na + float((a * a).sum()), nb + float((b * b).sum()))
    return {g: (dot, (na * nb) ** 0.5) for g, (dot, na, nb) in out.items()}


def nll(b, sign=1.0):
    return lambda m: sign * hf.unlearning_loss("nll", m, b)


def force(monkeypatch, form):
    """Every parameter (and the head pass) in ``form`` wherever that form is possible."""
    monkeypatch.setattr(products, "choose", lambda costs: form if costs.get(form, float("inf")) < float("inf")
                        else min(costs, key=costs.get))


def sample_loss(model, objective, batch_, ref, i):
    """Σ_{t in sample i} c_t ℓ_t with the objective's coefficients c_t (from the whole batch) held fixed: its
    gradient is sample i's share of the objective's."""
    lp = hf.token_logprobs(model, batch_)
    leaf = lp.detach().requires_grad_()
    loss = unlearning_loss_from_logprobs(objective, leaf, hf.batch_labels(batch_), ref_logprobs=ref, shift=True)
    coef, = torch.autograd.grad(loss, leaf)
    return (coef * lp)[i].sum()


def assert_matches_definition(model, objective, forget, retain, ref, result):
    """``result`` (a `measure_unlearning` with ``groups="parameter"``) against the materialized definition:
    per parameter, per forget sample (with ``per_instance=True``), and the nll retain term."""
    names = {n: n for n, _ in model.named_parameters()}
    loss = lambda m: hf.unlearning_loss(objective, m, forget, ref_logprobs=ref)
    for risk, b in (("forget", forget), ("retain", retain)):
        expected = materialized(model, loss, nll(b), names)
        for name, (dot, scale) in expected.items():
            assert abs(result.by_group[name][risk] - dot) <= 1e-9 * abs(dot) + 1e-12 * scale, (risk, name)
        # sample i's share: its tokens' coefficients only (per_instance=True)
        for i, value in enumerate((result.per_instance or {}).get(risk, [])):
            sample = lambda m, i=i: sample_loss(m, objective, forget, ref, i)
            (dot, scale), = materialized(model, sample, nll(b), {n: "all" for n in names}).values()
            assert abs(value - dot) <= 1e-9 * abs(dot) + 1e-12 * scale, (risk, i)
    # the nll retain term from the same pass: ∇R_rᵀ∇R_u and ‖∇R_r‖²
    for risk, b in (("forget", forget), ("retain", retain)):
        (dot, _), = materialized(model, nll(retain), nll(b), {n: "all" for n in names}).values()
        assert result.retain_term.total[risk] == pytest.approx(dot, rel=1e-9)
