"""Instance weighting: each forget sample's retaining G-effect and the weighted gradient against autograd on the
model's own logits, sample by sample (float64), and the weight function against its formula."""
import math

import pytest
import torch

import formulas
from geffect_kernels.guidance import ForgetGEffects, sample_weights

from geffect_models import batch, tiny_model


def own_logprobs(model, b):
    """ℓ [B, T-1] from the model's materialized logits (formulas' log-softmax), and the valid mask."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
    labels = b["labels"][:, 1:]
    lse = torch.logsumexp(logits, -1)
    valid = labels != -100
    zy = logits.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, zy - lse, 0.0), valid


def per_sample_gradients(model, b, objective, ref=None):
    """[g_s] (dicts name -> tensor) with g_s = Σ_{t∈s} ∂L/∂ℓ_t ∇ℓ_t, and the coefficients ∂L/∂ℓ."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lp, valid = own_logprobs(model, b)
    leaf = lp.detach().requires_grad_()
    coef, = torch.autograd.grad(formulas.objective(objective, leaf, valid, ref), leaf)
    out = []
    for s in range(lp.shape[0]):
        mask = torch.zeros_like(coef)
        mask[s] = 1
        gs = torch.autograd.grad(lp, list(params.values()), coef * mask, retain_graph=True, allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)})
    return out


def retain_gradient(model, b):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lp, valid = own_logprobs(model, b)
    gs = torch.autograd.grad(-(lp * valid).sum() / valid.sum(), list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)}


@pytest.mark.parametrize("held", [True, False], ids=["head-per-sample", "head-rows"])
@pytest.mark.parametrize("objective", ["ga", "npo", "wga"])
def test_geffects_and_weighted_gradient_match_autograd(objective, held, monkeypatch):
    # the head's share: from its gradient held per sample, or (too large to hold) from its rows projected on r
    from geffect_kernels.guidance import instance
    monkeypatch.setattr(instance, "per_sample_fits", lambda *shape: held)
    model = tiny_model("llama")
    forget, retain = batch(batch_size=3, length=7, seed=11, prompt=2), batch(batch_size=2, length=9, seed=12)
    ref = None
    if objective == "npo":
        ref = (torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 3) \
            * (forget["labels"][:, 1:] != -100)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    r = retain_gradient(model, retain)
    g = per_sample_gradients(model, forget, objective, ref)
    want_e = torch.tensor([sum(float((gs[n] * r[n]).sum()) for n in r) for gs in g], dtype=torch.float64)

    step = ForgetGEffects(model, params, forget, objective, ref_logprobs=ref)
    e = step.geffects(r)
    torch.testing.assert_close(e, want_e, rtol=1e-9, atol=1e-12 * float(want_e.abs().max()))

    w = torch.tensor([0.3, 1.9, 0.8], dtype=torch.float64)
    got = step.weighted_gradient(w)
    for n in params:
        want = sum(ws * gs[n] for ws, gs in zip(w.tolist(), g))
        scale = float(want.abs().max()) + 1e-30
        if n not in got:
            assert scale < 1e-12, n
            continue
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12 * scale, msg=n)


def test_unit_weights_give_the_objectives_gradient():
    model = tiny_model("llama")
    forget = batch(batch_size=3, length=7, seed=13)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = ForgetGEffects(model, params, forget, "ga").weighted_gradient(torch.ones(3, dtype=torch.float64))
    lp, valid = own_logprobs(model, forget)
    want = torch.autograd.grad(formulas.objective("ga", lp, valid), list(params.values()))
    for (n, _), w in zip(params.items(), want):
        torch.testing.assert_close(got[n], w, rtol=1e-9, atol=1e-13)


def weights_formula(e, tau):
    e = [float(x) for x in e]
    mean = sum(e) / len(e)
    std = math.sqrt(sum((x - mean) ** 2 for x in e) / len(e))
    z = [(x - mean) / std if std > 0 else 0.0 for x in e]
    ex = [math.exp(v / tau) for v in z]
    return [len(e) * v / sum(ex) for v in ex]


@pytest.mark.parametrize("tau", [0.25, 1.0, 3.0])
def test_weights_formula(tau):
    e = torch.randn(7, generator=torch.Generator().manual_seed(int(tau * 8)), dtype=torch.float64) * 1e-4
    w = sample_weights(e, tau)
    assert w.tolist() == pytest.approx(weights_formula(e, tau), rel=1e-12)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-12)
    order = torch.argsort(e)
    assert torch.all(w[order][1:] > w[order][:-1])  # more damage (lower e), less weight
    assert sample_weights(e * 1e6, tau).tolist() == pytest.approx(w.tolist(), rel=1e-9)  # scale-free


def test_weights_equal_when_effects_are_equal_and_bad_temperature():
    assert sample_weights(torch.full((4,), -2.5, dtype=torch.float64)).tolist() == [1.0] * 4
    assert sample_weights(torch.tensor([3.0], dtype=torch.float64)).tolist() == [1.0]
    with pytest.raises(ValueError, match="temperature"):
        sample_weights(torch.ones(3), 0.0)


def test_lora_adapters_geffects_and_weighted_gradient_match_autograd():
    from geffect_kernels.train.lora import add_lora
    model = add_lora(tiny_model("llama"), r=2, targets=["q_proj", "down_proj"]).double()
    with torch.no_grad():  # peft starts lora_B at 0, which would leave lora_A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    forget, retain = batch(batch_size=3, length=7, seed=21, prompt=1), batch(batch_size=2, length=8, seed=22)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    r = retain_gradient(model, retain)
    g = per_sample_gradients(model, forget, "ga")
    want_e = torch.tensor([sum(float((gs[n] * r[n]).sum()) for n in r) for gs in g], dtype=torch.float64)
    step = ForgetGEffects(model, params, forget, "ga")
    torch.testing.assert_close(step.geffects(r), want_e, rtol=1e-9, atol=1e-12 * float(want_e.abs().max()))
    w = torch.tensor([1.4, 0.2, 1.4], dtype=torch.float64)
    got = step.weighted_gradient(w)
    for n in params:
        want = sum(ws * gs[n] for ws, gs in zip(w.tolist(), g))
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12 * (float(want.abs().max()) + 1e-30), msg=n)
