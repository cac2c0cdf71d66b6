"""The G-effect profiler against a training step and materialized gradients, on Llama-shaped models (random
weights), NPO objective (reference log-probabilities: the model's own, shifted and perturbed per token, so that NPO
is not GA), 4 sequences per side, layer groups:

- ``step`` (the floor): one training step, NPO on the forget batch + NLL on the retain batch, forward and backward;
- ``materialized``: three full gradients (NPO, forget NLL, retain NLL) dotted parameter by parameter, as plain
  torch computes it (`materialized.py`);
- ``measure_unlearning``: the structured fast path (e_u, e_r per layer, and the retain term's);
- ``measure``: the generic path, three forward/backward passes.

Each method's ``vs_floor`` and ``vs_materialized``, its peak of extra tensor memory (the model excluded: the torch
profiler on the CPU, the allocator on a GPU) and, on the CPU, its counted flops (``gflops``, ``flops_vs_floor``:
`flops.py`, which no load blurs). On a GPU (``gpu``): the 1.1B and 6.7B shapes in bf16, after the bf16 fast path is
checked against float32 materialized gradients on 4 layers.

    python -m pytest benchmarks/test_geffect.py --benchmark-only
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import bench
from flops import counted_flops
from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.groups import parameter_groups
from large_shapes import SEQS, build, token_batches
from materialized import materialized_geffects

# (shape of large_shapes.SHAPES, tokens per sequence): one line per configuration
CONFIGS = {"cpu": [("tiny", 8)] if bench.TINY else [("L4-H256", 64), ("L4-H256", 256), ("L4-H512", 128)],
           "gpu": [("tiny", 8)] if bench.TINY else [("1.1b", 128), ("1.1b", 512), ("6.7b", 128), ("6.7b", 512)]}
METHODS = ["step", "materialized", "measure_unlearning", "measure"]
ROUNDS = 1 if bench.TINY else 3


def dtype_of(where):
    return torch.bfloat16 if where == "gpu" and not bench.GPU_SMOKE else torch.float32


def reference(model, forget):
    """Reference log-probabilities as after some unlearning: the model's own, shifted and perturbed per token (a
    uniform shift would give every sequence the same NPO weight, making NPO's gradient GA's)."""
    g = torch.Generator(device=forget["input_ids"].device).manual_seed(2)
    with torch.no_grad():
        lp = hf.token_logprobs(model, forget)
    return lp - 0.5 + 0.5 * torch.randn(lp.shape, device=lp.device, generator=g, dtype=lp.dtype)


@functools.lru_cache(maxsize=1)
def model_of(where, shape):
    return build(shape, dtype_of(where), bench.device(where)).eval()


@functools.lru_cache(maxsize=1)
def methods_of(where, shape, tokens):
    model = model_of(where, shape)
    forget, retain = token_batches(shape, tokens, bench.device(where))
    ref = reference(model, forget)
    return methods(model, forget, retain, ref)


def methods(model, forget, retain, ref):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(model, "layer")
    npo = lambda m: hf.unlearning_loss("npo", m, forget, ref_logprobs=ref)
    nll = lambda batch: lambda m: hf.unlearning_loss("nll", m, batch)
    risks = {"forget": nll(forget), "retain": nll(retain)}
    profiler = GEffectProfiler(model, groups="layer")
    return {
        "step": lambda: torch.autograd.grad(npo(model) + nll(retain)(model), params),
        "materialized": lambda: materialized_geffects(model, npo, risks, groups),
        "measure_unlearning": lambda: profiler.measure_unlearning("npo", forget, retain, ref_logprobs=ref),
        "measure": lambda: profiler.measure(npo, risks),
    }


def _cases():
    return [pytest.param(where, shape, tokens, method, marks=param.marks, id=f"{where}-{shape}-T{tokens}-{method}")
            for where, param in (("cpu", bench.CPU), ("gpu", bench.GPU)) for shape, tokens in CONFIGS[where]
            for method in METHODS]


@pytest.mark.parametrize("where,shape,tokens,method", _cases())
def test_geffect_cost(benchmark, where, shape, tokens, method):
    dev = bench.device(where)
    fn = methods_of(where, shape, tokens)[method]
    role = {"step": "floor", "materialized": "materialized"}.get(method)
    bench.timed(benchmark, fn, dev, rounds=ROUNDS, role=role, method=method, tokens_per_side=SEQS * tokens,
                group=f"geffect {shape} {SEQS}x{tokens} tokens {str(dtype_of(where))[6:]} {where}")
    if dev.type == "cuda":
        benchmark.extra_info["peak_mib"] = bench.cuda_peak_mib(fn, dev)
    else:
        benchmark.extra_info["peak_mib"] = bench.tensor_peak_mib(fn)
        benchmark.extra_info["gflops"] = counted_flops(fn) / 1e9


@pytest.mark.gpu
def test_geffect_bf16_fast_path_against_float32_materialized():
    """bf16 `measure_unlearning` against materialized gradients in float32 (float64 in a smoke run) from the same
    weights, per layer, on 4 layers of the 1.1B shape: the largest |difference| over layers within 5e-3 of the
    largest |value| (a smoke run: float32 against float64, 1e-5)."""
    dev = bench.device("gpu")
    shape, layers, tokens = ("tiny", 2, 16) if dev.type != "cuda" else ("1.1b", 4, 512)
    dtype, wide = (torch.bfloat16, torch.float32) if dev.type == "cuda" else (torch.float32, torch.float64)
    forget, retain = token_batches(shape, tokens, dev)
    model_wide = build(shape, wide, dev, layers=layers)
    model = copy.deepcopy(model_wide).to(dtype)  # the same weights, rounded
    ref = reference(model_wide, forget)
    want = methods(model_wide, forget, retain, ref)["materialized"]()
    got = GEffectProfiler(model).measure_unlearning("npo", forget, retain, ref_logprobs=ref.to(dtype),
                                                    retain_objective=None)
    for risk, values in want.items():
        scale = max(abs(v) for v in values.values())
        err = max(abs(got.by_group[g][risk] - v) for g, v in values.items()) / scale
        assert err <= (5e-3 if dev.type == "cuda" else 1e-5), (risk, err)
