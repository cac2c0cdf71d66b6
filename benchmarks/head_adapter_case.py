"""One GPU-suite row for a LoRA adapter on the LM head (`hf.LMHead.adapted`): the fused loss over the concatenated
inputs [h, s·A h] · [W, B]ᵀ against float64 on the same rounded values, gradients of A, B and h included, and a
callable to time it. `head_adapter_row` is all a suite needs; tests/test_lora_head.py runs it on the CPU."""
from __future__ import annotations

import torch

import geffect_kernels as gk
from geffect_kernels.hf import HeadAdapter, LMHead


def _case(n, h, v, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=g) * (0.6 / h**0.5)).to(dtype)
    lora_a = torch.nn.Linear(h, r, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lora_a.weight.copy_(torch.randn(r, h, device=device, generator=g) / h**0.5)
    weight_b = (torch.randn(v, r, device=device, generator=g) * 0.3 / r**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::13] = -100
    return hidden, weight, lora_a, weight_b, labels


def _loss_and_grads(hidden, weight, lora_a, weight_b, labels, scale, backend):
    """WGA through `LMHead.adapted` and its gradients with respect to (A, B, h)."""
    hidden, weight_b = hidden.detach().requires_grad_(), weight_b.detach().requires_grad_()
    head = LMHead(weight, None, None, (HeadAdapter(lora_a, torch.nn.Identity(), weight_b, scale),))
    x, w = head.adapted(hidden)
    loss = gk.unlearning_loss("wga", x, w, labels, backend=backend)
    return loss, torch.autograd.grad(loss, (lora_a.weight, weight_b, hidden))


def head_adapter_row(device, *, n=4096, h=4096, v=32000, r=16, dtype=torch.bfloat16, backend="auto"):
    """({"loss", "dA", "dB", "dh"}: relative errors against float64, a zero-argument callable that runs the fused
    forward and backward once) for a rank-``r`` adapter on an ``[v, h]`` head over ``n`` tokens."""
    hidden, weight, lora_a, weight_b, labels = _case(n, h, v, r, dtype, device)
    scale = 2.0
    loss, grads = _loss_and_grads(hidden, weight, lora_a, weight_b, labels, scale, backend)
    a64 = torch.nn.Linear(h, r, bias=False, device=device, dtype=torch.float64)
    with torch.no_grad():
        a64.weight.copy_(lora_a.weight)
    leaves = (a64.weight, weight_b.double().requires_grad_(), hidden.double().requires_grad_())
    logits = leaves[2] @ weight.double().t() + scale * (a64(leaves[2]) @ leaves[1].t())  # materialized, float64
    lp = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    expected = gk.unlearning_loss_from_logprobs("wga", torch.where(labels != -100, lp, 0), labels)
    want = torch.autograd.grad(expected, leaves)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    loss, expected = float(loss.detach()), float(expected.detach())
    errors = {"loss": abs(loss - expected) / max(abs(expected), 1e-30),
              **{k: rel(a, b) for k, a, b in zip(("dA", "dB", "dh"), grads, want)}}
    return errors, lambda: _loss_and_grads(hidden, weight, lora_a, weight_b, labels, scale, backend)


def head_adapter_yardsticks(device, *, n=4096, h=4096, v=32000, r=16, dtype=torch.bfloat16, backend="auto"):
    """{"floor", "naive"}: zero-argument callables on `head_adapter_row`'s inputs, forward + backward once each: the
    fused loss on the head without its adapter (what the adapter's fused path cannot beat), and the adapted logits
    materialized in ``dtype`` with autograd (what the fused path replaces)."""
    hidden, weight, lora_a, weight_b, labels = _case(n, h, v, r, dtype, device)
    scale = 2.0

    def floor():
        x = hidden.detach().requires_grad_()
        loss = gk.unlearning_loss("wga", x, weight, labels, backend=backend)
        return loss, torch.autograd.grad(loss, (x,))

    def naive():
        x, b = hidden.detach().requires_grad_(), weight_b.detach().requires_grad_()
        logits = (x @ weight.t() + scale * (lora_a(x) @ b.t())).float()
        lp = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        loss = gk.unlearning_loss_from_logprobs("wga", torch.where(labels != -100, lp, 0), labels)
        return loss, torch.autograd.grad(loss, (lora_a.weight, b, x))
    return {"floor": floor, "naive": naive}
