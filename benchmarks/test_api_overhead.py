"""The public API's per-call cost over the raw backend call, forward + backward of GA: the backend's
`weighted_loss` called directly (already-flat inputs, the scale given: the floor), `unlearning_loss` (shape, dtype
and device checks, flattening, 1/n_valid on the device) and `unlearning_loss(check_values=True)` (also NaN/inf over
hidden states and head, and the label range). A small shape shows the fixed cost; a large head what the value
checks read. CPU: the torch backend, float32; GPU: triton, bf16.

    python -m pytest benchmarks/test_api_overhead.py --benchmark-only
"""
from __future__ import annotations

import functools

import pytest
import torch

import bench
import geffect_kernels as gk
from geffect_kernels.backends.interface import LossOptions
from geffect_kernels.backends.registry import get_backend
from geffect_kernels.catalog import resolve

SHAPES = {"cpu": [(64, 32, 300)] if bench.TINY else [(64, 32, 300), (256, 1024, 32000)],
          "gpu": [(64, 32, 300)] if bench.TINY else [(256, 64, 1000), (1024, 4096, 128256)]}
CALLS = ["raw backend call", "unlearning_loss", "unlearning_loss check_values"]


def backend_of(where):
    return "triton" if where == "gpu" else "torch"


def dtype_of(where):
    return torch.bfloat16 if where == "gpu" and not bench.GPU_SMOKE else torch.float32


@functools.lru_cache(maxsize=1)
def inputs_of(where, n, h, v):
    dev = bench.device(where)
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(n, h, device=dev, generator=g).to(dtype_of(where)).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=g) / h**0.5).to(dtype_of(where)).requires_grad_()
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def call_of(name, backend, hidden, weight, labels):
    if name == "raw backend call":
        impl = get_backend(backend, hidden)
        opts = LossOptions(-100, None, resolve("ga", {}).weighting, 1.0 / int((labels != -100).sum()))

        def raw():
            loss = impl.weighted_loss(hidden, weight, None, labels, None, opts)
            loss.backward()
            return loss
        return raw
    check = {"check_values": True} if name.endswith("check_values") else {}

    def api():
        loss = gk.unlearning_loss("ga", hidden, weight, labels, backend=backend, **check)
        loss.backward()
        return loss
    return api


def _cases():
    return [pytest.param(where, shape, name, marks=param.marks,
                         id=f"{where}-N{shape[0]}-H{shape[1]}-V{shape[2]}-{name}")
            for where, param in (("cpu", bench.CPU), ("gpu", bench.GPU)) for shape in SHAPES[where]
            for name in CALLS]


@pytest.mark.parametrize("where,shape,name", _cases())
def test_api_call_overhead(benchmark, where, shape, name):
    dev = bench.device(where)
    hidden, weight, labels = inputs_of(where, *shape)
    fn = call_of(name, backend_of(where), hidden, weight, labels)
    n, h, v = shape
    rounds = 1 if bench.TINY else (50 if n * v < 10**6 else 7)
    loss = bench.timed(benchmark, fn, dev, rounds=rounds, role="floor" if name == CALLS[0] else None, call=name,
                       group=f"api overhead N{n} H{h} V{v} {str(dtype_of(where))[6:]} {where}")
    assert torch.isfinite(loss)
