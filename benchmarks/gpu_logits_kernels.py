"""GPU: the logits-input token-loss kernels (csrc `cuda`, `triton`) and the Gram kernel, in one unattended run.

1. Correctness: weighted loss and gradient from logits, bf16/fp16/fp32, against `reference` in float64 on the
   upcast logits (odd V, ignored positions, softcap), for every backend that runs here.
2. Speed at N=8192, V=128256, bf16 (DESIGN §6): forward+backward with the gradient written in place. Every
   timed call starts from a fresh copy of the logits (the kernels overwrite them), so the copy is timed alone
   and subtracted. The fewest bytes such a kernel can move: read the logits once and write the gradient once
   (2·N·V·2 bytes); its bandwidth is compared with a device-to-device copy measured in the same run, and its
   time with naive torch and Liger's in-place cross-entropy (when liger-kernel is installed).
3. Gram inner product: csrc `ghost_inner_product` against two matmuls and an elementwise product.

    python benchmarks/gpu_logits_kernels.py        # writes benchmarks/results/gpu_logits_kernels.csv (+ $OUT)
    python benchmarks/gpu_logits_kernels.py --smoke  # CPU plumbing check

Prints a short table last.
"""
import csv
import sys
import os
import pathlib
import shutil

import provenance
import torch
import triton.testing

import geffect_kernels as gk
from geffect_kernels.backends.registry import available_backends

N, V = 8192, 128256
RESULTS = pathlib.Path(__file__).parent / "results" / "gpu_logits_kernels.csv"


def check_correctness(backends, device="cuda", dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for backend in backends:
        for dtype in dtypes:
            logits = (torch.randn(301, 5003, device=device, generator=g) * 4).to(dtype)
            labels = torch.randint(0, 5003, (301,), device=device, generator=g)
            labels[::7] = -100
            z64 = logits.double().requires_grad_()
            ref = gk.unlearning_loss_from_logits("wga", z64, labels, softcap=30.0, backend="reference")
            ref.backward()
            z = logits.clone().requires_grad_()
            loss = gk.unlearning_loss_from_logits("wga", z, labels, softcap=30.0, backend=backend)
            loss.backward()
            loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
            grad_err = ((z.grad.double() - z64.grad).norm() / z64.grad.norm()).item()
            rows.append(dict(kind="accuracy", provider=backend, dtype=str(dtype).removeprefix("torch."),
                             loss_rel_err=f"{loss_err:.2e}", grad_rel_err=f"{grad_err:.2e}"))
    return rows


def time_ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8])


def speed(backends):
    torch.manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    work = torch.empty_like(logits)
    nbytes = 2 * logits.numel() * logits.element_size()  # one read + one write
    copy_ms = time_ms(lambda: work.copy_(logits))[0]
    copy_bw = nbytes / copy_ms / 1e9  # TB/s: 2·bytes/ms·1e-9

    def in_place(backend):
        def run():
            work.copy_(logits)
            z = work.detach().requires_grad_()  # a fresh leaf on work's storage: the gradient goes there
            gk.unlearning_loss_from_logits("ga", z, labels, backend=backend, inplace=True).backward()
        return run

    def naive():
        z = logits.detach().requires_grad_()
        torch.nn.functional.cross_entropy(z.float(), labels).backward()

    candidates = {f"{b} in place": in_place(b) for b in backends}
    candidates["naive torch"] = naive
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss()

        def liger_ce():
            work.copy_(logits)
            z = work.detach().requires_grad_()
            liger(z, labels).backward()
        candidates["liger cross-entropy"] = liger_ce
    except ImportError:
        pass
    rows = [dict(kind="time", provider="d2d copy", ms_median=f"{copy_ms:.3f}", tb_per_s=f"{copy_bw:.2f}")]
    for name, fn in candidates.items():
        med, p20, p80 = time_ms(fn)
        kernel_ms = med - copy_ms if name != "naive torch" else med
        rows.append(dict(kind="time", provider=name, ms_median=f"{med:.3f}", ms_p20=f"{p20:.3f}", ms_p80=f"{p80:.3f}",
                         kernel_ms=f"{kernel_ms:.3f}", tb_per_s=f"{nbytes / kernel_ms / 1e9:.2f}",
                         fraction_of_copy=f"{copy_ms / kernel_ms:.2f}"))
    return rows


def gram(device="cuda", rows=2048, timed=True):
    """The Gram form Σ (G_a G_bᵀ) ∘ (X_a X_bᵀ): csrc kernel (error vs float64) and two matmuls, timed."""
    from geffect_kernels.csrc import ghost_available, ghost_inner_product
    if not ghost_available(torch.device(device)):
        return []
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ga, xa, gb, xb = (torch.randn(rows, 4096, device=device).to(dtype) for _ in range(4))
    expected = ((ga.double() @ gb.double().T) * (xa.double() @ xb.double().T)).sum().item()
    err = abs(ghost_inner_product(ga, xa, gb, xb).item() - expected) / abs(expected)
    out = [dict(kind="gram", provider="csrc ghost", loss_rel_err=f"{err:.2e}")]
    if timed:
        out[0]["ms_median"] = f"{time_ms(lambda: ghost_inner_product(ga, xa, gb, xb))[0]:.3f}"
        ms = time_ms(lambda: ((ga @ gb.T).float() * (xa @ xb.T).float()).sum())[0]
        out.append(dict(kind="gram", provider="two matmuls + product", ms_median=f"{ms:.3f}"))
    return out


def main():
    if "--smoke" in sys.argv:  # CPU plumbing check of the correctness parts (no timing, nothing written)
        rows = check_correctness(["cpu"], "cpu", (torch.float32,)) + gram("cpu", rows=64, timed=False)
        print(rows)
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    backends = [b for b in ("cuda", "triton") if b in available_backends("cuda")]
    rows = check_correctness(backends) + speed(backends) + gram()
    fields = ["kind", "provider", "dtype", "loss_rel_err", "grad_rel_err", "ms_median", "ms_p20", "ms_p80",
              "kernel_ms", "tb_per_s", "fraction_of_copy", "gpu", "commit"]
    for r in rows:
        r.update(gpu=provenance.machine(), commit=provenance.commit())
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    if os.environ.get("OUT"):
        shutil.copy(RESULTS, os.environ["OUT"])
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if k not in ("gpu", "commit", "kind")))


if __name__ == "__main__":
    main()
