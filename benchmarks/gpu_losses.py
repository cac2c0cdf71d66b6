"""GPU benchmark of the unlearning losses (issue 3), one unattended run on an H100:

    python benchmarks/gpu_losses.py            # full run, ~5 min on an H100
    python benchmarks/gpu_losses.py --quick    # V = 32000 only, no accuracy section
    python benchmarks/gpu_losses.py --smoke    # CPU plumbing check (tiny shapes, interpreter, no timings of note)

Times forward+backward (median, p20, p80 of `triton.testing.do_bench`) and peak memory
(`max_memory_allocated` after a reset, inputs excluded, the returned gradients included) for naive torch
(backend "reference": bf16 logits, float32 softmax, autograd), the chunked torch backend, this triton
backend in lean and fast mode, Liger (`LigerFusedLinearCrossEntropyLoss` with bf16 / float32 dW
accumulator and token scaling, `LigerFusedLinearJSD`, `LigerCrossEntropyLoss`) and CCE
(`linear_cross_entropy`, default and `filter_eps=None`) where installed, and three bare bf16 matmuls of
the same shapes (the floor). N = 8192, H = 4096, V ∈ {32000, 128256}, bf16, flat and peaky inputs
(DESIGN §6). Accuracy: loss and gradients in bf16 against float64 on the upcast inputs (chunked torch
backend in float64), incl. N·V > 2^31. Writes benchmarks/results/gpu_losses.csv and prints a ratio table last.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import provenance
import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import geffect_kernels as gk  # noqa: E402
from geffect_kernels.triton import set_logits_budget  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_losses.csv"
FIELDS = ["kind", "kernel", "provider", "objective", "shape", "ms_median", "ms_p20", "ms_p80", "peak_mib",
          "loss_rel_err", "grad_rel_err", "gpu", "commit"]
FAST_BUDGET = 3 * 2**30  # fast mode: logit tiles for up to 3 GiB (N = 8192, V = 128256 fits in one chunk)


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(n, h, v, dist, device, seed=0):
    """hidden, weight (bf16), labels; logits ~ N(0, 0.6²) (flat) or hidden 8× larger (peaky)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * (8.0 if dist == "peaky" else 1.0)
    weight = torch.randn(v, h, generator=g) * (0.6 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    dtype = torch.float32 if SMOKE else torch.bfloat16
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def median_max_prob(hidden, weight):
    rows = hidden[:256].float() @ weight.float().T
    return torch.softmax(rows, -1).max(-1).values.median().item()


# ------------------------------------------------------------------------------------------- providers
def ours(name, mode, **kw):
    def run(h, w, y, extra):
        set_logits_budget(FAST_BUDGET if mode == "fast" else 0)
        return gk.unlearning_loss(name, *_shaped(name, h, w, y), backend="triton", **extra(name), **kw)
    return run


def package(name, backend):
    return lambda h, w, y, extra: gk.unlearning_loss(name, *_shaped(name, h, w, y), backend=backend, **extra(name))


def _shaped(name, h, w, y):
    if name == "npo":  # sequence level: 8 sequences
        return h.reshape(8, -1, h.shape[-1]), w, y.reshape(8, -1)
    return h, w, y


def liger_flce(accum_dtype=None, token_scaling=False):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    kwargs = {"accum_dtype": accum_dtype} if accum_dtype is not None else {}
    if token_scaling:
        kwargs["use_token_scaling"] = True
    loss = LigerFusedLinearCrossEntropyLoss(**kwargs)
    return lambda h, w, y, extra: loss(w, h, y)


def cce(filter_eps="auto"):
    from cut_cross_entropy import linear_cross_entropy
    if filter_eps == "auto":
        return lambda h, w, y, extra: linear_cross_entropy(h, w, y)
    return lambda h, w, y, extra: linear_cross_entropy(h, w, y, filter_eps=filter_eps)


def floor(h, w, y, extra):
    """Three bare matmuls of the shapes a fused head needs: logits, dh, dW."""
    z = h @ w.T
    return z @ w, z.T @ h


def kl_ours():
    return lambda h, w, y, extra: gk.kl_loss(h, w, extra.ref_hidden, w.detach(), y, backend="triton")


def kl_package(backend):
    return lambda h, w, y, extra: gk.kl_loss(h, w, extra.ref_hidden, w.detach(), y, backend=backend)


def liger_jsd(beta):
    from liger_kernel.transformers import LigerFusedLinearJSD
    jsd = LigerFusedLinearJSD(jsd_beta=beta)
    return lambda h, w, y, extra: jsd(h, w, extra.ref_hidden, w.detach())


class Extra:
    """Per-shape side inputs: reference log-probabilities (tnpo, npo) and reference hidden states (kl)."""

    def __init__(self, h, w, y):
        with torch.no_grad():
            set_logits_budget(0)
            lp = gk.token_logprobs(h, w, y, backend="triton" if h.is_cuda or SMOKE else "torch")
        self.ref_flat = (lp + 0.3 * torch.randn_like(lp)).detach()
        self.ref_hidden = (h + 0.1 * torch.randn_like(h)).detach()

    def __call__(self, name):
        if name == "npo":
            return {"ref_logprobs": self.ref_flat.reshape(8, -1)}
        return {"ref_logprobs": self.ref_flat} if name in ("tnpo", "wtnpo") else {}


def providers(kernel):
    """(provider, objective, factory) to time; factories that need a missing package are skipped."""
    if kernel == "linear":
        out = [("floor: 3 bf16 matmuls", "-", lambda: floor)]
        for name in ("ga", "wga", "tnpo", "npo"):
            out += [("naive torch", name, lambda n=name: package(n, "reference")),
                    ("torch chunked", name, lambda n=name: package(n, "torch")),
                    ("triton lean", name, lambda n=name: ours(n, "lean"))]
            if name != "npo":
                out.append(("triton fast", name, lambda n=name: ours(n, "fast")))
        out += [("liger bf16 acc", "ga", liger_flce), ("liger fp32 acc", "ga", lambda: liger_flce(torch.float32)),
                ("liger token scaling", "wga", lambda: liger_flce(token_scaling=True)),
                ("cce default", "ga", cce), ("cce exact", "ga", lambda: cce(None))]
        return out
    return [("naive torch", "kl", lambda: kl_package("reference")),
            ("torch chunked", "kl", lambda: kl_package("torch")),
            ("triton lean", "kl", kl_ours),  # KL has the lean mode only
            ("liger jsd beta=1", "kl", lambda: liger_jsd(1.0))]


# ------------------------------------------------------------------------------------------ measuring
def fwd_bwd(fn, h, w, y, extra):
    def step():
        h.grad = w.grad = None
        out = fn(h, w, y, extra)
        if isinstance(out, torch.Tensor):
            out.backward()
    return step


def measure(step, device):
    if device.type != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), min(times), max(times), float("nan")
    import triton.testing
    step()  # compile, warm caches
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    med, p20, p80 = triton.testing.do_bench(step, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80, peak


def grad_errors(fn, h, w, y, extra, name):
    """Loss and gradient (dh, dW stacked) relative errors of a bf16 run against float64 on the upcast inputs."""
    def grads_of(hh, ww, f):
        hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        loss = f(hh, ww, y, extra)
        dh, dw = torch.autograd.grad(loss, (hh, ww))
        return loss.double(), dh.double(), dw.double()

    loss, dh, dw = grads_of(h, w, fn)
    del_loss, ref_dh, ref_dw = grads_of(h.double(), w.double(), package(name, "torch"))
    num = ((dh - ref_dh).norm() ** 2 + (dw - ref_dw).norm() ** 2).sqrt()
    den = (ref_dh.norm() ** 2 + ref_dw.norm() ** 2).sqrt()
    return abs((loss - del_loss) / del_loss).item(), (num / den).item()


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 32000 only, no accuracy section")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check with tiny shapes")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    gpu = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    n, h = (64, 32) if args.smoke else (8192, 4096)
    vocabs = (300,) if args.smoke else ((32000,) if args.quick else (32000, 128256))
    rev = provenance.commit()
    rows = []

    def record(**row):
        rows.append({**{k: "" for k in FIELDS}, **row, "gpu": gpu, "commit": rev})

    for v in vocabs:
        for dist in ("flat", "peaky"):
            hidden, weight, labels = make_inputs(n, h, v, dist, device)
            extra = Extra(hidden, weight, labels)
            shape = f"N={n},H={h},V={v},{dist}"
            print(f"\n{shape}: median max-probability {median_max_prob(hidden, weight):.2e}", flush=True)
            hg, wg = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            for kernel in ("linear", "kl"):
                for provider, objective, factory in providers(kernel):
                    try:
                        fn = factory()
                    except ImportError as exc:
                        print(f"  skip {provider}: {exc}", flush=True)
                        continue
                    try:
                        med, p20, p80, peak = measure(fwd_bwd(fn, hg, wg, labels, extra), device)
                    except Exception as exc:  # one provider failing (e.g. out of memory) must not stop the run
                        print(f"  {provider} {objective}: FAILED {type(exc).__name__}: {exc}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    print(f"  {kernel:6s} {provider:22s} {objective:5s} {med:8.2f} ms  {peak:8.0f} MiB", flush=True)
                    record(kind="time", kernel=kernel, provider=provider, objective=objective, shape=shape,
                           ms_median=f"{med:.3f}", ms_p20=f"{p20:.3f}", ms_p80=f"{p80:.3f}", peak_mib=f"{peak:.0f}")
            logits_benchmark(hidden, weight, labels, shape, device, record)
            if not args.quick:
                accuracy(hidden, weight, labels, extra, shape, record)
            del hg, wg, hidden, weight, extra
    if not args.quick and not args.smoke:
        hidden, weight, labels = make_inputs(32768, h, 128256, "peaky", device, seed=1)
        accuracy(hidden, weight, labels, Extra(hidden, weight, labels), "N=32768,H=4096,V=128256,peaky (N*V>2^31)",
                 record, objectives=("ga",))
    write(rows)
    ratio_table(rows)


def logits_benchmark(hidden, weight, labels, shape, device, record):
    """Logits given: one clone of the logits per call is included (in-place kernels consume them)."""
    with torch.no_grad():
        logits = hidden @ weight.T

    def ours_inplace():
        z = logits.clone().requires_grad_()
        gk.unlearning_loss_from_logits("ga", z * 1.0, labels, backend="triton", inplace=True).backward()

    def naive():
        z = logits.clone().requires_grad_()
        gk.unlearning_loss_from_logits("ga", z, labels, backend="reference").backward()

    cases = [("naive torch", naive), ("triton in place", ours_inplace)]
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        ce = LigerCrossEntropyLoss()

        def liger():
            z = logits.clone().requires_grad_()
            ce(z * 1.0, labels).backward()
        cases.append(("liger cross entropy", liger))
    except ImportError:
        pass
    for provider, step in cases:
        med, p20, p80, peak = measure(step, device)
        print(f"  logits {provider:22s} ga    {med:8.2f} ms  {peak:8.0f} MiB", flush=True)
        record(kind="time", kernel="logits", provider=provider, objective="ga", shape=shape, ms_median=f"{med:.3f}",
               ms_p20=f"{p20:.3f}", ms_p80=f"{p80:.3f}", peak_mib=f"{peak:.0f}")


def accuracy(hidden, weight, labels, extra, shape, record, objectives=("ga", "wga", "tnpo")):
    cases = [(f"triton {mode}", name, ours(name, mode)) for name in objectives for mode in ("lean", "fast")]
    cases.append(("naive torch", "ga", package("ga", "reference")))
    for provider, factory in (("liger bf16 acc", liger_flce), ("liger fp32 acc", lambda: liger_flce(torch.float32)),
                              ("cce default", cce), ("cce exact", lambda: cce(None))):
        try:
            cases.append((provider, "ga", factory()))
        except ImportError:
            pass
    for provider, name, fn in cases:
        try:
            loss_err, grad_err = grad_errors(fn, hidden, weight, labels, extra, name)
        except Exception as exc:
            print(f"  accuracy {provider} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"  accuracy {provider:22s} {name:5s} loss {loss_err:.1e}  grad {grad_err:.1e}", flush=True)
        record(kind="accuracy", kernel="linear", provider=provider, objective=name, shape=shape,
               loss_rel_err=f"{loss_err:.3e}", grad_rel_err=f"{grad_err:.3e}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def write(rows):
    """benchmarks/results/gpu_losses.csv, and a copy under $OUT (the folder a lent GPU machine sends back);
    a smoke run writes to the temporary directory only."""
    targets = [Path(tempfile.gettempdir()) / "gpu_losses_smoke.csv"] if SMOKE else [RESULTS]
    if os.environ.get("OUT") and not SMOKE:
        targets.append(Path(os.environ["OUT"]) / RESULTS.name)
    for out in targets:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {len(rows)} rows to {out}")


def ratio_table(rows):
    """Per shape: each timing against the three-matmul floor, the four-pass floor (4/3 of it), Liger and CCE."""
    times = [r for r in rows if r["kind"] == "time"]
    print("\nratio table (time / reference time; peak MiB)")
    for shape in dict.fromkeys(r["shape"] for r in times):
        here = {(r["provider"], r["objective"], r["kernel"]): r for r in times if r["shape"] == shape}
        ms = lambda key: float(here[key]["ms_median"]) if key in here else float("nan")  # noqa: E731
        floor3 = ms(("floor: 3 bf16 matmuls", "-", "linear"))
        refs = {"x floor3": floor3, "x floor4": floor3 * 4 / 3, "x liger": ms(("liger bf16 acc", "ga", "linear")),
                "x liger32": ms(("liger fp32 acc", "ga", "linear")), "x cce exact": ms(("cce exact", "ga", "linear")),
                "x triton lean ga": ms(("triton lean", "ga", "linear"))}
        print(f"\n{shape}")
        print(f"  {'kernel':6s} {'provider':22s} {'obj':5s} {'ms':>8s} {'MiB':>8s} " +
              " ".join(f"{k:>16s}" for k in refs))
        for (provider, objective, kernel), r in here.items():
            t = float(r["ms_median"])
            cells = " ".join(f"{t / ref:16.2f}" if ref == ref and ref > 0 else f"{'-':>16s}" for ref in refs.values())
            print(f"  {kernel:6s} {provider:22s} {objective:5s} {t:8.2f} {r['peak_mib']:>8s} {cells}")
    acc = [r for r in rows if r["kind"] == "accuracy"]
    if acc:
        print("\naccuracy (bf16 against float64 on upcast inputs; issue targets: loss ≤ 1e-3, grad ≤ 3e-3)")
        for r in acc:
            print(f"  {r['shape']:42s} {r['provider']:18s} {r['objective']:5s} loss {float(r['loss_rel_err']):.1e}"
                  f"  grad {float(r['grad_rel_err']):.1e}")


if __name__ == "__main__":
    main()
