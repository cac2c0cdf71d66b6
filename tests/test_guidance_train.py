"""Guided training steps end to end: the gradient a guided step hands to the optimizer against the guidance's
formula on gradients taken independently (autograd, whole model), stop rules in the loop, and bad settings."""
import copy
import json

import pytest
import torch

from geffect_kernels import hf
from geffect_kernels.train import TrainConfig, tiny_llama, train
from geffect_kernels.train.schedule import batch_indices

from demo_cases import encoded_sets
from test_guidance_rectify import expected as rectified

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return encoded_sets()


def model_of(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0).double()


def config(**kw):
    base = dict(objective="ga", steps=1, batch_size=4, lr=1e-3, progress=False, max_grad_norm=None)
    return TrainConfig(**{**base, **kw})


def first_step_gradient(monkeypatch, model, forget, retain, cfg):
    """The .grad the optimizer sees at step 1 (read where clipping would run)."""
    seen = {}
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, *args, **kwargs):
        if not seen:
            seen.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(model, forget, retain, cfg)
    return seen


def gradient(model, loss):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


def step_batches(forget, retain, cfg):
    f = forget.batch(batch_indices(len(forget), cfg.batch_size, cfg.seed, 0))
    r = retain.batch(batch_indices(len(retain), cfg.batch_size, cfg.seed + 1, 0))
    return f, r


@pytest.mark.parametrize("retain_weight", [1.0, 0.5])
def test_rectify_step_is_rectified_objective_plus_retain(setup, monkeypatch, retain_weight):
    tokenizer, forget, retain = setup
    cfg = config(guidance="rectify", retain_weight=retain_weight, forget_weight=2.0)
    start = model_of(tokenizer)
    got = first_step_gradient(monkeypatch, copy.deepcopy(start), forget, retain, cfg)
    f, r = step_batches(forget, retain, cfg)
    start.train()
    g = gradient(start, 2.0 * hf.unlearning_loss("ga", start, f))
    rr = gradient(start, retain_weight * hf.unlearning_loss("nll", start, r))
    from geffect_kernels.geffect.groups import parameter_groups
    groups = parameter_groups(start, "layer")
    want = rectified(g, rr, groups)
    dots = {}
    for n in g:
        dots[groups[n]] = dots.get(groups[n], 0.0) + float((g[n] * rr[n]).sum())
    assert any(v < 0 for v in dots.values()), "no conflicting group: the test would not test the projection"
    for n in g:
        torch.testing.assert_close(got[n], want[n] + rr[n], rtol=1e-9, atol=1e-12, msg=n)


def test_instance_step_weights_samples_by_their_retaining_geffect(setup, monkeypatch):
    tokenizer, forget, retain = setup
    cfg = config(guidance="instance", objective="npo", guidance_temperature=0.7)
    start = model_of(tokenizer)
    got = first_step_gradient(monkeypatch, copy.deepcopy(start), forget, retain, cfg)
    f, r = step_batches(forget, retain, cfg)
    start.train()
    rr = gradient(start, hf.unlearning_loss("nll", start, r))
    # NPO's reference is the starting model, its log-probabilities cached in float32
    ref = hf.token_logprobs(start, f).detach().float().double()
    x = hf.head_inputs(start, f)
    from geffect_kernels.logprobs import token_logprobs
    lp = token_logprobs(x.hidden, x.weight, x.labels, **x.as_kwargs())
    valid = hf.batch_labels(f)[:, 1:] != -100
    leaf = lp.detach().requires_grad_()
    beta = 0.1
    seq = (leaf * valid).sum(1) - (ref * valid).sum(1)
    loss = ((2 / beta) * torch.nn.functional.softplus(beta * seq)).mean()
    coef, = torch.autograd.grad(loss, leaf)
    per_sample = []
    for s in range(lp.shape[0]):
        mask = torch.zeros_like(coef)
        mask[s] = 1
        per_sample.append(gradient_of(start, lp, coef * mask))
    e = torch.tensor([sum(float((gs[n] * rr[n]).sum()) for n in rr) for gs in per_sample], dtype=torch.float64)
    z = (e - e.mean()) / e.std(unbiased=False)
    w = len(e) * torch.exp(z / 0.7) / torch.exp(z / 0.7).sum()
    for n in rr:
        want = rr[n] + sum(ws * gs[n] for ws, gs in zip(w.tolist(), per_sample))
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12, msg=n)


def gradient_of(model, out, grad_out):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in params], grad_out, retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


def test_stop_rule_ends_the_run_and_logs_the_step(setup, tmp_path):
    tokenizer, forget, retain = setup
    cfg = config(steps=6, geffect_every=1, stop_when="step>3", out_dir=str(tmp_path), checkpoint_every=6)
    model = model_of(tokenizer)
    result = train(model, forget, retain, cfg)
    assert result.stopped_at == 3 and result.steps == 3
    last = result.metrics[-1]
    assert last["step"] == 4 and last["stopped"] == "step>3 (4)" and last["updates"] == 3 and "loss" not in last
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["stopped"] == "step>3 (4)" and [m["step"] for m in logged] == [1, 2, 3, 4]
    # the checkpoint is the state after 3 updates; a rerun resumes there and stops at the same step
    again = train(model_of(tokenizer), forget, retain, cfg)
    assert again.stopped_at == 3 and again.resumed_from == 3
    for (n, p), q in zip(model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("kw, message", [
    (dict(guidance="project"), "unknown guidance"),
    (dict(guidance="rectify", retain_objective="kl"), "needs the nll retain term"),
    (dict(guidance="instance", retain_weight=0.0), "needs the nll retain term"),
    (dict(guidance="instance", guidance_temperature=0.0), "guidance_temperature"),
    (dict(stop_when="retain_ratio<-1"), "geffect_every"),
    (dict(stop_when="loss<1", geffect_every=1), "unknown quantity"),
])
def test_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        config(**kw)
