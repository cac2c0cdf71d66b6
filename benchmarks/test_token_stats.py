"""`token_logprobs` and `token_stats` (ℓ_t, entropy, Var_p[log p]), forward only, on each speed backend against one
GEMM (the logits matmul, which any exact method must run: the floor) and naive eager (full logits, log_softmax).

    python -m pytest benchmarks/test_token_stats.py --benchmark-only

On a GPU (``gpu`` marker) the triton and cpp_cuda backends, and first their statistics against the chunked torch
backend in float64 on the same rounded inputs (flat and peaky logits, odd V with bias and soft-cap, every input
dtype). Triton computes float32 logits from 16-bit inputs; the cpp_cuda backend's logits are BLAS products rounded
to the input dtype, hence its looser 16-bit tolerance (4 units of that dtype's rounding).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import pytest
import torch

import bench
import geffect_kernels as gk
from geffect_kernels.backends.registry import load_backend
from loss_cases import BF16, FP16, FP32, NAMES, make_inputs

SHAPES = {"cpu": (64, 32, 301) if bench.TINY else (1024, 512, 32000),
          "gpu": (64, 32, 301) if bench.TINY else (8192, 4096, 128256)}
BACKENDS = {"cpu": ["torch", "cpp_cpu"], "gpu": ["triton", "cpp_cuda"]}  # one line per device


def dtype_of(where):
    return BF16 if where == "gpu" and not bench.GPU_SMOKE else FP32


def runs_here(backend, dev):
    """Whether ``backend`` runs on ``dev``, asking only that backend (no other extension is built)."""
    loaded = load_backend(backend)
    return loaded is not None and loaded.is_available(dev)


@functools.lru_cache(maxsize=1)
def inputs_of(where):
    return make_inputs(*SHAPES[where], "flat", dtype_of(where), bench.device(where))


def _cases():
    out = []
    for where, param in (("cpu", bench.CPU), ("gpu", bench.GPU)):
        calls = [("matmul: logits only", None), ("naive eager", "logprobs")]
        calls += [(b, what) for what in ("logprobs", "stats") for b in BACKENDS[where]]
        out += [pytest.param(where, b, what, marks=param.marks, id=f"{where}-{b}-{what or 'logits'}")
                for b, what in calls]
    return out


@pytest.mark.parametrize("where,provider,what", _cases())
def test_token_statistics_forward(benchmark, where, provider, what):
    dev = bench.device(where)
    backend = "oracle" if provider == "naive eager" else provider
    if what and not runs_here(backend, dev):
        pytest.skip(f"{backend} not available on {dev}")
    x = inputs_of(where)
    if what is None:
        fn = lambda: x.hidden @ x.weight.T
    else:
        call = gk.token_logprobs if what == "logprobs" else gk.token_stats
        fn = lambda: call(x.hidden, x.weight, x.labels, backend=backend)
    n, h, v = SHAPES[where]
    role = {"matmul: logits only": "floor", "naive eager": "naive"}.get(provider)
    with torch.no_grad():
        out = bench.timed(benchmark, fn, dev, role=role, provider=provider, what=what or "logits",
                          group=f"forward N{n} H{h} V{v} {NAMES[dtype_of(where)]} {where}")
    if what and dtype_of(where) == FP32:  # every backend's log-probabilities equal the float64 ones
        d = x.double()
        exact = gk.token_logprobs(d.hidden, d.weight, x.labels, backend="torch")
        got = out if what == "logprobs" else out[0]
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


# -- GPU correctness ---------------------------------------------------------------------------------------------
UNIT_ROUNDOFF = {BF16: 2.0**-8, FP16: 2.0**-11, FP32: 2.0**-24}


@dataclass(frozen=True)
class StatsCheck:
    name: str
    backend: str
    dtype: torch.dtype
    n: int = 2048
    h: int = 1024
    v: int = 32000
    dist: str = "flat"
    bias: bool = False
    softcap: float | None = None

    @property
    def tolerance(self):
        """(logprob, entropy and variance) relative errors allowed against float64."""
        if self.backend == "cpp_cuda" and self.dtype != FP32:  # logits rounded to the input dtype
            return 1e-3 if self.dtype == FP16 else 3e-3, 4 * UNIT_ROUNDOFF[self.dtype]
        return 5e-5, 5e-5

    def smoke(self):
        """A size the Triton interpreter runs in a second, in float32 (its 16-bit arithmetic is not the GPU's)."""
        return replace(self, n=48, h=32, v=301 if self.v < 50_000 else 509, dtype=FP32)


STATS_CHECKS = [
    StatsCheck("token_stats", "triton", BF16),
    StatsCheck("token_stats peaky", "triton", BF16, dist="peaky"),
    StatsCheck("token_stats bias+softcap V50257", "triton", BF16, v=50257, bias=True, softcap=30.0),
    StatsCheck("token_stats float32", "triton", FP32),
    StatsCheck("token_stats", "cpp_cuda", BF16),
    StatsCheck("token_stats peaky softcap", "cpp_cuda", FP16, dist="peaky", softcap=30.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("check", STATS_CHECKS, ids=lambda c: f"{c.backend}-{c.name}-{NAMES[c.dtype]}")
def test_token_stats_against_float64(check):
    dev = bench.device("gpu")
    check = check.smoke() if dev.type != "cuda" else check
    if not runs_here(check.backend, dev):
        pytest.skip(f"{check.backend} not available on {dev}")
    x = make_inputs(check.n, check.h, check.v, check.dist, check.dtype, dev, bias=check.bias)
    got = gk.token_stats(x.hidden, x.weight, x.labels, bias=x.bias, softcap=check.softcap, backend=check.backend)
    d = x.double()
    exact = gk.token_stats(d.hidden, d.weight, x.labels, bias=d.bias, softcap=check.softcap, backend="torch")
    valid = x.labels != -100
    errors = [((g.double() - e)[valid].norm() / e[valid].norm().clamp_min(1e-300)).item() for g, e in zip(got, exact)]
    tol_lp, tol_stats = check.tolerance
    assert errors[0] <= tol_lp and errors[1] <= tol_stats and errors[2] <= tol_stats, errors
