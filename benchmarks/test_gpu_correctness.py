"""The fused losses on the GPU against float64 on the same rounded inputs, before anything is timed (``gpu`` marker;
a smoke run: the same cases at tiny sizes on the CPU, Triton interpreted, float32):

- every Triton mode (lean, fast single- and multi-chunk), bias + soft-cap at V = 50257, NPO, float16 / bfloat16 /
  float32, KL lean and fast, N·V > 2³¹ and the C++ CUDA backend (loss ≤ 1e-3, gradients ≤ 3e-3, bf16 ≤ 5e-3);
- forward + backward calls that must not make the host wait on the device (`torch.cuda.set_sync_debug_mode`).
"""
from __future__ import annotations

import functools

import pytest
import torch

import bench
import loss_cases as cases
from geffect_kernels.backends.registry import ALIASES, load_backend


def runs_here(backend, dev):
    loaded = load_backend(ALIASES.get(backend, backend))
    return loaded is not None and loaded.is_available(dev)


@pytest.mark.gpu
@pytest.mark.parametrize("check", cases.correctness_checks(),
                         ids=lambda c: f"{c.backend}-{c.objective}-{c.name}-{cases.NAMES[c.dtype]}")
def test_fused_loss_against_float64(check):
    dev = bench.device("gpu")
    smoke = dev.type != "cuda"
    check = check.smoke() if smoke else check
    if not runs_here(check.backend, dev):
        pytest.skip(f"{check.backend} not available on {dev}")
    loss_err, dh_err, dw_err, note, shape = cases.run_check(check, dev, smoke)
    if "fast" in check.name and check.backend == "triton":
        assert note.startswith("fast"), note  # the fast cases did run the fast mode
    tol_loss, tol_grad = check.tolerance
    assert loss_err <= tol_loss and dh_err <= tol_grad and dw_err <= tol_grad, (loss_err, dh_err, dw_err, note)


@functools.lru_cache(maxsize=1)
def no_sync_inputs(dev):
    n, h, v = (48, 32, 301) if dev.type != "cuda" else (1024, 1024, 32000)
    return cases.make_inputs(n, h, v, "flat", torch.float32 if dev.type != "cuda" else torch.bfloat16, dev)


NO_SYNC = [(backend, name) for backend in ("triton", "cpp_cuda")
           for name in ("wga", "tnpo", "kl", "wga from logits") + (("kl fast",) if backend == "triton" else ())]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,name", NO_SYNC, ids=[f"{b}-{n}" for b, n in NO_SYNC])
def test_fused_loss_without_host_sync(backend, name):
    dev = bench.device("gpu")
    if not runs_here(backend, dev):
        pytest.skip(f"{backend} not available on {dev}")
    inputs = no_sync_inputs(dev)
    fn = cases.no_sync_calls(inputs, backend)[name]
    hidden, weight = inputs.hidden.detach().requires_grad_(), inputs.weight.detach().requires_grad_()
    fn(hidden, weight, None)  # warm-up: compiles, builds caches
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn(hidden, weight, None).backward()
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
