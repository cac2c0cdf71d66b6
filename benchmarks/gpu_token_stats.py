"""The GPU suite's ``stats`` part: `token_stats` (ℓ_t, entropy, Var_p[log p]) on the triton and cpp_cuda backends.

1. Correctness: each backend's three statistics against the chunked torch backend in float64 on the same rounded
   inputs (flat and peaky logits, odd V with bias and soft-cap, every input dtype), as relative errors over the
   valid tokens in the loss / dh / dW columns: logprob / entropy / logprob_var. Triton computes float32 logits
   from 16-bit inputs; the cpp_cuda backend's logits are BLAS products rounded to the input dtype, hence its
   looser 16-bit tolerance (4 units of that dtype's rounding: a peaky bf16 row's entropy moves by ~1e-2).
2. Speed (GPU only) at N=8192, H=4096, V=128256, bf16: token_stats against token_logprobs, forward only, and the
   bare logits matmul for scale.

Run as ``python benchmarks/gpu_suite.py stats --csv FILE [--smoke]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import geffect_kernels as gk
from gpu_cases import BF16, FP16, FP32, NAMES, make_inputs

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


def checks():
    return [
        StatsCheck("token_stats", "triton", BF16),
        StatsCheck("token_stats peaky", "triton", BF16, dist="peaky"),
        StatsCheck("token_stats bias+softcap V50257", "triton", BF16, v=50257, bias=True, softcap=30.0),
        StatsCheck("token_stats float32", "triton", FP32),
        StatsCheck("token_stats", "cpp_cuda", BF16),
        StatsCheck("token_stats peaky softcap", "cpp_cuda", FP16, dist="peaky", softcap=30.0),
    ]


def _errors(got, exact, labels):
    valid = labels != -100
    return [((g.double() - e)[valid].norm() / e[valid].norm().clamp_min(1e-300)).item() for g, e in zip(got, exact)]


def _runs_here(backend, dev):
    """Whether ``backend`` runs on ``dev``, asking only that backend (no other extension is built)."""
    from geffect_kernels.backends.registry import _load
    loaded = _load(backend)
    return loaded is not None and loaded.is_available(dev)


def check_correctness(rec, dev, smoke):
    for check in checks():
        check = check.smoke() if smoke else check
        ids = dict(case=check.name, provider=check.backend, objective="stats", dtype=NAMES[check.dtype],
                   shape=f"N={check.n},H={check.h},V={check.v},{check.dist}")
        if not _runs_here(check.backend, dev):
            rec.row(**ids, status="skipped", note=f"{check.backend} not available on {dev}")
            continue
        with rec.case(**ids):
            x = make_inputs(check.n, check.h, check.v, check.dist, check.dtype, dev, bias=check.bias)
            got = gk.token_stats(x.hidden, x.weight, x.labels, bias=x.bias, softcap=check.softcap,
                                 backend=check.backend)
            d = x.double()
            exact = gk.token_stats(d.hidden, d.weight, x.labels, bias=d.bias, softcap=check.softcap, backend="torch")
            lp_err, entropy_err, var_err = _errors(got, exact, x.labels)
            tol_lp, tol_stats = check.tolerance
            ok = lp_err <= tol_lp and entropy_err <= tol_stats and var_err <= tol_stats
            rec.row(**ids, status="ok" if ok else "FAIL", loss_rel_err=lp_err, dh_rel_err=entropy_err,
                    dw_rel_err=var_err, tolerance=f"{tol_lp:g}/{tol_stats:g}",
                    note="loss/dh/dW columns: logprob/entropy/logprob_var")


def speed(rec, dev, n=8192, h=4096, v=128256):
    import triton.testing
    x = make_inputs(n, h, v, "flat", BF16, dev)
    shape = f"N={n},H={h},V={v},bf16 forward"
    calls = {("matmul: logits only", "-"): lambda: x.hidden @ x.weight.T}
    for backend in ("triton", "cpp_cuda"):
        if _runs_here(backend, dev):
            calls[(backend, "stats")] = lambda b=backend: gk.token_stats(x.hidden, x.weight, x.labels, backend=b)
            calls[(backend, "logp")] = lambda b=backend: gk.token_logprobs(x.hidden, x.weight, x.labels, backend=b)
    for (provider, objective), fn in calls.items():
        ids = dict(case="forward", provider=provider, objective=objective, dtype="bf16", shape=shape)
        with rec.case(**ids), torch.no_grad():
            med, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8])
            rec.row(**ids, status="ok", ms_median=med, ms_p20=p20, ms_p80=p80)


def run(rec, dev, smoke=False):
    check_correctness(rec, dev, smoke)
    if not smoke:
        speed(rec, dev)
