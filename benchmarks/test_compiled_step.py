"""A training step's tail compiled whole (``gpu`` marker): the final RMSNorm, the LM head and the fused NPO loss,
forward + backward, under ``torch.compile(fullgraph=True)`` against the same step eager, in one group (eager is the
floor: the compiled member's ``vs_floor`` is compiled over eager). Before anything is timed the compiled step's loss
and gradients (input, norm weight, head) must equal eager's to rounding, and the compilation (forward and backward)
runs once outside the timed rounds.

On a GPU: the triton backend, inductor, bf16, 8 sequences of 1024 tokens, H 4096, V 128256. A smoke run (CPU,
tiny): the torch backend under ``aot_eager`` (the same fullgraph capture and custom operators; inductor's C++ code
generation would take a CI core minutes)."""
from __future__ import annotations

import functools

import pytest
import torch

import bench
import geffect_kernels as gk

SHAPE = (4, 16, 32, 301) if bench.TINY else (8, 1024, 4096, 128256)  # sequences, tokens per sequence, H, V
# relative error of compiled over eager: inductor fuses the norm in float32 where eager rounds each bf16 op
TOLERANCE = {torch.bfloat16: (5e-3, 2e-2), torch.float32: (1e-5, 1e-4)}  # (loss, gradients)


def dtype_of():
    return torch.float32 if bench.GPU_SMOKE else torch.bfloat16


@functools.lru_cache(maxsize=1)
def case():
    """(inputs, the eager step's loss function, the compiled one): compiled once for both members."""
    dev, dtype = bench.device("gpu"), dtype_of()
    b, t, h, v = SHAPE
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, t, h, device=dev, generator=g).to(dtype).requires_grad_()
    norm_weight = (1 + 0.1 * torch.randn(h, device=dev, generator=g)).to(dtype).requires_grad_()
    head = (torch.randn(v, h, device=dev, generator=g) * (0.6 / h**0.5)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), device=dev, generator=g)
    labels[:, :3] = -100  # a prompt
    backend = "torch" if dev.type == "cpu" else "triton"

    def final_norm(x, norm_weight):
        return torch.nn.functional.rms_norm(x, (h,), norm_weight, eps=1e-6)

    with torch.no_grad():
        ref = gk.token_logprobs(final_norm(x, norm_weight), head, labels, shift=True, backend=backend) - 0.1

    def loss_fn(x, norm_weight, head):
        return gk.unlearning_loss("npo", final_norm(x, norm_weight), head, labels, ref_logprobs=ref, shift=True,
                                 backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if dev.type == "cpu" else "inductor")
    return (x, norm_weight, head), loss_fn, compiled


def loss_and_grads(fn, leaves):
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def relative_errors(leaves, eager, compiled):
    """{"loss", "dx", "dnorm", "dW"}: relative errors of the compiled step against eager (norms, in float64)."""
    (want, want_grads), (got, got_grads) = loss_and_grads(eager, leaves), loss_and_grads(compiled, leaves)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))  # noqa: E731
    return {"loss": rel(got, want), **{k: rel(a, b) for k, a, b in zip(("dx", "dnorm", "dW"), got_grads, want_grads)}}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_compiled_step_against_eager(benchmark, mode):
    dev, dtype = bench.device("gpu"), dtype_of()
    leaves, eager, compiled = case()
    errors = relative_errors(leaves, eager, compiled)  # also compiles the forward and the backward, untimed
    loss_bound, grad_bound = TOLERANCE[dtype]
    assert errors["loss"] <= loss_bound and max(errors.values()) <= grad_bound, errors
    fn = compiled if mode == "compiled" else eager

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss = fn(*leaves)
        loss.backward()
        return loss

    b, t, h, v = SHAPE
    bench.timed(benchmark, step, dev, group=f"compiled npo step {b}x{t}-H{h}-V{v} {str(dtype).split('.')[-1]} gpu",
                role="floor" if mode == "eager" else None, mode=mode,
                **{f"err_{k}": round(e, 8) for k, e in errors.items()})
    if dev.type == "cuda":
        benchmark.extra_info["peak_mib"] = bench.cuda_peak_mib(step, dev)
