"""The fused token losses, forward + backward, on each speed backend, grouped by objective and shape; in every group
the floor (the three matmuls any exact method must run: logits, dh, dW) and naive eager (full logits, autograd).

    python -m pytest benchmarks/test_fused_losses.py --benchmark-only           # CPU: torch, cpp_cpu
    bash benchmarks/run_gpu_suite.sh                                             # GPU: triton, cpp_cuda, Liger, CCE

Each member's ``vs_floor`` and ``vs_naive`` land in its ``extra_info`` (conftest.py), with its peak memory: on the
CPU the resident peak of one call beyond its inputs, in a fresh process; on a GPU the allocator's. A case is one line
of ``CPU_GROUPS`` / ``GPU_GROUPS``: an objective and the providers timed beside the floor and naive eager.
"""
from __future__ import annotations

import functools

import pytest
import torch

import bench
import loss_cases as cases
from geffect_kernels.triton import set_logits_budget

YARDSTICKS = ["floor: 3 matmuls", "naive eager"]
CPU_GROUPS = [  # objective, providers (each a key of loss_cases.PROVIDERS)
    ("ga", ["torch", "cpp_cpu"]),
    ("wga", ["torch", "cpp_cpu"]),
    ("npo", ["torch", "cpp_cpu"]),
    ("kl", ["torch", "cpp_cpu"]),
    ("undial", ["torch", "cpp_cpu"]),
    ("ceu", ["torch", "cpp_cpu"]),
]
GPU_GROUPS = [
    ("ga", ["torch", "triton lean", "triton fast", "cpp_cuda", "liger bf16 acc", "liger fp32 acc", "cce default",
            "cce exact"]),
    ("wga", ["triton lean", "triton fast", "cpp_cuda", "liger token scaling"]),
    ("tnpo", ["triton lean"]),
    ("npo", ["triton lean"]),
    ("kl", ["torch", "triton lean", "triton fast", "liger jsd beta=1"]),
    ("undial", ["torch", "triton lean", "triton fast", "cpp_cuda"]),
    ("ceu", ["torch", "triton lean", "triton fast", "cpp_cuda"]),
]
# (N, H, V, logits distribution): the shapes; the last GPU one with the lean and fast GA kernels only
CPU_SHAPES = [(64, 32, 301, "flat")] if bench.TINY else [(1024, 512, 32000, "flat")]
GPU_SHAPES = [(64, 32, 301, "flat")] if bench.TINY else [
    (8192, 4096, 128256, "flat"), (8192, 4096, 128256, "peaky"), (8192, 4096, 32000, "flat"),
    (8192, 4096, 32000, "peaky")]
GPU_LONG = [] if bench.TINY else [((32768, 4096, 128256, "flat"), "ga", ["floor: 3 matmuls", "triton lean",
                                                                         "triton fast"])]


def cases_of(where, shapes, groups, extra=()):
    out = [(where, shape, objective, provider) for shape in shapes for objective, providers in groups
           for provider in YARDSTICKS + providers]
    out += [(where, shape, objective, provider) for shape, objective, providers in extra for provider in providers]
    mark = bench.GPU.marks if where == "gpu" else ()
    return [pytest.param(*case, marks=mark, id=f"{where}-{_shape_id(case[1])}-{case[2]}-{case[3]}") for case in out]


def _shape_id(shape):
    n, h, v, dist = shape
    return f"N{n}-H{h}-V{v}-{dist}"


CASES = cases_of("cpu", CPU_SHAPES, CPU_GROUPS) + cases_of("gpu", GPU_SHAPES, GPU_GROUPS, GPU_LONG)


def dtype_of(where):
    return torch.bfloat16 if where == "gpu" and not bench.GPU_SMOKE else torch.float32


@functools.lru_cache(maxsize=1)  # one shape's inputs at a time: the cases of a shape run one after another
def inputs_of(where, shape):
    n, h, v, dist = shape
    return cases.make_inputs(n, h, v, dist, dtype_of(where), bench.device(where))


@functools.lru_cache(maxsize=1)
def expected_loss(where, shape, objective):
    """The loss in float64 on the same rounded inputs (naive eager), checked where the members run on the CPU."""
    exact = inputs_of(where, shape).double()
    with torch.no_grad():
        return cases.loss_fn(objective, exact, "oracle")(exact.hidden, exact.weight, None).item()


def fwd_bwd(where, shape, objective, provider):
    """One forward + backward of ``provider`` on the case's inputs: a callable returning the loss (or the floor's
    outputs). Raises ImportError for a package that is not installed."""
    budget, make = cases.PROVIDERS[provider](objective)
    inputs = inputs_of(where, shape)
    fn = make(inputs)
    hidden, weight = inputs.hidden.detach().requires_grad_(), inputs.weight.detach().requires_grad_()

    def step():
        hidden.grad = weight.grad = None
        set_logits_budget(budget)
        try:
            out = fn(hidden, weight, None)
            if isinstance(out, torch.Tensor):
                out.backward()
            return out
        finally:
            set_logits_budget(0)
    return step


def step_of(where, n, h, v, dist, objective, provider):
    """What a fresh process measures for the peak (bench.fresh_process_peak_mib)."""
    return fwd_bwd(where, (n, h, v, dist), objective, provider)


@pytest.mark.parametrize("where,shape,objective,provider", CASES)
def test_fused_loss_forward_backward(benchmark, where, shape, objective, provider):
    dev = bench.device(where)
    if provider in cases.OURS and not _runs_here(provider, dev):
        pytest.skip(f"{provider} not available on {dev}")
    try:
        step = fwd_bwd(where, shape, objective, provider)
    except ImportError as exc:
        pytest.skip(f"not importable: {exc}")
    role = {"floor: 3 matmuls": "floor", "naive eager": "naive"}.get(provider)
    out = bench.timed(benchmark, step, dev, group=f"fused {objective} {_shape_id(shape)} {cases.NAMES[dtype_of(where)]}"
                      f" {where}", role=role, objective=objective, provider=provider)
    if provider in cases.OURS and dev.type == "cpu":  # every backend computes the same loss
        assert out.item() == pytest.approx(expected_loss(where, shape, objective), rel=2e-5 if bench.TINY else 1e-4)
    if dev.type == "cuda":
        benchmark.extra_info["peak_mib"] = bench.cuda_peak_mib(step, dev)
    elif where == "cpu" and benchmark.enabled:
        benchmark.extra_info["peak_mib"] = bench.fresh_process_peak_mib("test_fused_losses", "step_of", where, *shape,
                                                                        objective, provider)


def _runs_here(provider, dev):
    from geffect_kernels.backends.registry import load_backend
    backend = {"naive eager": "oracle", "triton lean": "triton", "triton fast": "triton"}.get(provider, provider)
    loaded = load_backend(backend)
    return loaded is not None and loaded.is_available(dev)
