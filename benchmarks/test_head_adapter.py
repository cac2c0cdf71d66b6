"""A LoRA adapter on the LM head, fused (``gpu`` marker): `head_adapter_case.head_adapter_row`'s WGA loss through
`hf.LMHead.adapted` (the concatenated inputs [h, s·A h] · [W, B]ᵀ), forward + backward with the gradients of A, B
and h, in one group with the plain fused loss on the head without the adapter (the floor) and the adapted logits
materialized with autograd (naive). Before the timing, the fused row's relative errors of the loss, dA, dB and dh
against float64 materialized logits on the same rounded inputs are asserted within the bounds of its dtype and kept
in ``extra_info``.

On a GPU: bf16, N 4096, H 4096, V 32000, r 16, the default backend. A smoke run (CPU, tiny): float32, the torch
backend."""
from __future__ import annotations

import functools

import pytest
import torch

import bench
from head_adapter_case import head_adapter_row, head_adapter_yardsticks

SIZES = dict(n=61, h=24, v=301, r=3) if bench.TINY else dict(n=4096, h=4096, v=32000, r=16)
BOUND = {torch.bfloat16: (5e-3, 2e-2), torch.float32: (1e-4, 1e-4)}  # (loss, gradients): relative to float64


def dtype_of():
    return torch.float32 if bench.GPU_SMOKE else torch.bfloat16


@functools.lru_cache(maxsize=1)
def members():
    """{member: (callable, role, errors or None)}: built once for the group (the float64 check runs once)."""
    dev, dtype = bench.device("gpu"), dtype_of()
    backend = "torch" if dev.type == "cpu" else "auto"
    errors, fused = head_adapter_row(dev, dtype=dtype, backend=backend, **SIZES)
    yardsticks = head_adapter_yardsticks(dev, dtype=dtype, backend=backend, **SIZES)
    return {"fused, adapter on the head": (fused, None, errors),
            "floor: fused, no adapter": (yardsticks["floor"], "floor", None),
            "naive: materialized logits": (yardsticks["naive"], "naive", None)}


@pytest.mark.gpu
@pytest.mark.parametrize("member", ["floor: fused, no adapter", "fused, adapter on the head",
                                    "naive: materialized logits"], ids=["floor", "fused", "naive"])
def test_head_adapter_fused(benchmark, member):
    dev, dtype = bench.device("gpu"), dtype_of()
    fn, role, errors = members()[member]
    extra = {}
    if errors is not None:
        loss_bound, grad_bound = BOUND[dtype]
        assert errors["loss"] <= loss_bound and max(errors.values()) <= grad_bound, errors
        extra = {f"err_{k}": float(f"{e:.3g}") for k, e in errors.items()}
    group = "head adapter N{n}-H{h}-V{v}-r{r}".format(**SIZES) + f" {str(dtype).split('.')[-1]} gpu"
    bench.timed(benchmark, fn, dev, group=group, role=role, provider=member, **extra)
    if dev.type == "cuda":
        benchmark.extra_info["peak_mib"] = bench.cuda_peak_mib(fn, dev)
