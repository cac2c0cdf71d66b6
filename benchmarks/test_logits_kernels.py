"""The logits-input kernels and the Gram ("ghost") inner product, against plain torch, in the same run.

- logits-input token loss (GA), forward + backward with the gradient written over the logits: the floor is one
  copy of the logits (the fewest bytes such a kernel moves: read them once, write the gradient once), beside torch
  eager (log_softmax + gather + backward: ``naive``), the chunked ``torch`` backend, and the C++ / Triton kernels in
  place through the public API (which validates its input first) and, on the CPU, through the backend alone; Liger's
  in-place cross-entropy on a GPU when importable. Every in-place call starts from a fresh copy made outside the
  timing. Peak memory beyond the logits: a fresh process's resident peak on the CPU, the allocator's on a GPU.
- Gram inner product ⟨G_aᵀX_a, G_bᵀX_b⟩: plain torch in both forms (two Gram matmuls, or both weight gradients; the
  one with fewer flops is the floor) and every implementation `gram_implementations` offers on the device.

    python -m pytest benchmarks/test_logits_kernels.py --benchmark-only
"""
from __future__ import annotations

import functools

import pytest
import torch

import bench
import geffect_kernels as gk
from geffect_kernels.backends.cpp import build
from geffect_kernels.backends.cpp.backend import BACKENDS
from geffect_kernels.backends.cpp.ghost import fastest_gram, gram_implementations
from geffect_kernels.backends.interface import LossOptions
from geffect_kernels.catalog import resolve

LOGITS_SHAPES = {"cpu": (61, 503) if bench.TINY else (4096, 32000),
                 "gpu": (61, 503) if bench.TINY else (8192, 128256)}
LOGITS_VARIANTS = {  # name -> backends it needs (None: plain torch), per device
    "cpu": ["copy", "torch eager", "torch backend", "cpp_cpu in place", "cpp_cpu in place, kernel only"],
    "gpu": ["copy", "torch eager", "torch backend", "triton in place", "cpp_cuda in place", "liger cross-entropy"],
}
# (rows per side, feature size): the projection form takes fewer flops at the first, the Gram form at the second;
# 3072 rows span more than one 2048-row kernel tile.
GRAM_SHAPES = {"cpu": [(40, 24)] if bench.TINY else [(3072, 1024), (512, 4096)],
               "gpu": [(40, 24)] if bench.TINY else [(2048, 4096)]}


def dtype_of(where):
    return torch.bfloat16 if where == "gpu" and not bench.GPU_SMOKE else torch.float32


# -- logits-input token loss ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def logits_data(where):
    n, v = LOGITS_SHAPES[where]
    dev = bench.device(where)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, v, device=dev, generator=g) * 2).to(dtype_of(where))
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    labels[::7] = -100
    valid = labels != -100
    expected = torch.log_softmax(logits.double(), -1).gather(1, labels.clamp_min(0)[:, None])[valid].mean().item()
    return logits, labels, torch.empty_like(logits), expected


def loss_call(variant, labels, n_valid):
    """variant -> f(leaf logits) -> loss, backward done."""
    if variant == "torch eager":
        def eager(z):
            valid = labels != -100
            loss = torch.log_softmax(z.float(), -1).gather(1, labels.clamp_min(0)[:, None])[valid].mean()
            loss.backward()
            return loss
        return eager
    if variant == "liger cross-entropy":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss()
        return lambda z: _backward(-liger(z, labels))
    if variant == "cpp_cpu in place, kernel only":
        opts = LossOptions(weighting=resolve("ga", {}).weighting, scale=1.0 / n_valid, inplace=True)
        return lambda z: _backward(BACKENDS["cpp_cpu"].weighted_loss_from_logits(z, labels, None, opts))
    backend = variant.split()[0]
    inplace = "in place" in variant
    return lambda z: _backward(gk.unlearning_loss_from_logits("ga", z, labels, backend=backend, inplace=inplace))


def _backward(loss):
    loss.backward()
    return loss


def logits_step(where, variant):
    """One call of ``variant`` from a fresh copy of the logits: (setup, call); the copy floor has no setup."""
    source, labels, work, _ = logits_data(where)
    if variant == "copy":
        return None, lambda: work.copy_(source)
    fn = loss_call(variant, labels, int((labels != -100).sum()))

    def setup():  # the in-place variants overwrite their input: refill it, outside the timing
        return (work.copy_(source).detach().requires_grad_(),), {}
    return setup, fn


def logits_peak_step(where, variant):
    """What a fresh process measures for the peak (bench.fresh_process_peak_mib)."""
    setup, fn = logits_step(where, variant)
    return fn if setup is None else lambda: fn(*setup()[0])


def _logits_cases():
    out = []
    for where, param in (("cpu", bench.CPU), ("gpu", bench.GPU)):
        out += [pytest.param(where, v, marks=param.marks, id=f"{where}-{v}") for v in LOGITS_VARIANTS[where]]
    return out


@pytest.mark.parametrize("where,variant", _logits_cases())
def test_logits_loss_forward_backward(benchmark, where, variant):
    dev = bench.device(where)
    needs = variant.split()[0]
    if needs in ("cpp_cpu", "cpp_cuda", "triton") and not _available(needs, dev):
        pytest.skip(f"{needs} not available on {dev}")
    try:
        setup, fn = logits_step(where, variant)
    except ImportError as exc:
        pytest.skip(f"not importable: {exc}")
    n, v = LOGITS_SHAPES[where]
    role = {"copy": "floor", "torch eager": "naive"}.get(variant)
    out = bench.timed(benchmark, fn, dev, setup=setup, role=role, variant=variant,
                      group=f"logits ga N{n} V{v} {str(dtype_of(where))[6:]} {where}")
    if variant != "copy" and dtype_of(where) == torch.float32 and variant != "liger cross-entropy":
        assert out.item() == pytest.approx(logits_data(where)[3], rel=1e-5)
    if dev.type == "cuda":
        benchmark.extra_info["peak_mib"] = bench.cuda_peak_mib(logits_peak_step(where, variant), dev)
    elif where == "cpu" and benchmark.enabled:
        benchmark.extra_info["peak_mib"] = bench.fresh_process_peak_mib("test_logits_kernels", "logits_peak_step",
                                                                        where, variant)


def _available(backend, dev):
    if backend == "cpp_cpu":
        return build.available("cpu")
    from geffect_kernels.backends.registry import load_backend
    loaded = load_backend(backend)
    return loaded is not None and loaded.is_available(dev)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_logits_kernels_against_float64(dtype):
    """Weighted loss (WGA, soft-cap) and its gradient from logits, for every backend that runs here, against the
    oracle in float64 on the same rounded logits (odd V, ignored positions)."""
    dev = bench.device("gpu")
    if dev.type != "cuda" and dtype != torch.float32:
        pytest.skip("the interpreter's 16-bit arithmetic is not the GPU's")
    backends = [b for b in ("cpp_cuda", "triton") if _available(b, dev)]
    assert backends, f"no logits backend on {dev}"
    n, v = (31, 503) if bench.TINY else (301, 5003)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, v, device=dev, generator=g) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    labels[::7] = -100
    z64 = logits.double().requires_grad_()
    ref = _backward(gk.unlearning_loss_from_logits("wga", z64, labels, softcap=30.0, backend="oracle"))
    tol = 5e-3 if dtype == torch.bfloat16 else 3e-3
    for backend in backends:
        z = logits.clone().requires_grad_()
        loss = _backward(gk.unlearning_loss_from_logits("wga", z, labels, softcap=30.0, backend=backend))
        assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item()), backend
        assert ((z.grad.double() - z64.grad).norm() / z64.grad.norm()).item() <= tol, backend


# -- Gram inner product ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def gram_data(where, rows, d):
    dev = bench.device(where)
    g = torch.Generator(device=dev).manual_seed(1)
    sides = [torch.randn(rows, d, device=dev, generator=g).to(dtype_of(where)) for _ in range(4)]
    exact = torch_projection(*(t.double() for t in sides)).item()
    return sides, exact


def torch_gram(ga, xa, gb, xb):
    """Σ_ij (G_a G_bᵀ)_ij (X_a X_bᵀ)_ij: cost ∝ Na·Nb·(d_out + d_in)."""
    return ((ga @ gb.T).float() * (xa @ xb.T).float()).sum(dtype=torch.float64)


def torch_projection(ga, xa, gb, xb):
    """⟨G_aᵀX_a, G_bᵀX_b⟩ from both weight gradients: cost ∝ (Na + Nb)·d_out·d_in."""
    return ((ga.T @ xa).float() * (gb.T @ xb).float()).sum(dtype=torch.float64)


def gram_methods(where):
    dev = bench.device(where)
    found = {f"gram_implementations: {k}": fn for k, fn in gram_implementations(dev, dtype_of(where)).items()}
    return {"torch gram form": torch_gram, "torch projection form": torch_projection, **found}


def _gram_cases():
    out = []
    for where, param in (("cpu", bench.CPU), ("gpu", bench.GPU)):
        names = list(gram_methods(where)) if where == "cpu" or torch.cuda.is_available() or bench.GPU_SMOKE else [
            "torch gram form"]
        out += [pytest.param(where, rows, d, name, marks=param.marks, id=f"{where}-N{rows}-d{d}-{name}")
                for rows, d in GRAM_SHAPES[where] for name in names]
    return out


@pytest.mark.parametrize("where,rows,d,method", _gram_cases())
def test_gram_inner_product(benchmark, where, rows, d, method):
    dev = bench.device(where)
    sides, exact = gram_data(where, rows, d)
    fn = gram_methods(where)[method]
    cheaper = "torch projection form" if 2 * rows * d * d < rows * rows * 2 * d else "torch gram form"
    extra = {"fastest_gram": fastest_gram(*sides)[0]} if method == cheaper else {}
    out = bench.timed(benchmark, fn, dev, setup=lambda: (tuple(sides), {}),
                      group=f"gram Na{rows} Nb{rows} d{d} {str(dtype_of(where))[6:]} {where}",
                      role="floor" if method == cheaper else None, method=method, **extra)
    # float32 products summed in float64: error ∝ 2⁻²⁴ × the sum of |terms| (~√terms × the result for random signs);
    # 1e-3 of the exact value is far above that and far below any wrong answer; bf16 inputs: 5e-3
    if dtype_of(where) == torch.float32 or method.startswith("gram_implementations"):
        rtol = 1e-3 if dtype_of(where) == torch.float32 else 5e-3
        assert float(out) == pytest.approx(exact, rel=rtol)
