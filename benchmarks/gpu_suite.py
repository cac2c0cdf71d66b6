"""One part of the GPU suite, run by benchmarks/run_gpu_suite.sh under its own timeout:

    python benchmarks/gpu_suite.py correctness|speed|overhead|logits|stats --csv FILE [--smoke]
    python benchmarks/gpu_suite.py table --csv FILE [--parts PARTS_CSV]

- correctness: every case against float64 on the same rounded inputs (loss ≤ 1e-3, gradients ≤ 3e-3 relative,
  bf16 ≤ 5e-3), and forward+backward calls that must not synchronize the host (`torch.cuda.set_sync_debug_mode`);
- speed: forward+backward, median and p20/p80 of `triton.testing.do_bench`, peak memory over the inputs;
- overhead: the public API's per-call cost over the raw backend call (`api_overhead`);
- logits: the logits-input kernels and the Gram kernel (`gpu_logits_kernels`);
- stats: `token_stats` against float64 and timed against `token_logprobs` (`gpu_token_stats`);
- table: the compact summary of the CSV (at most 12,000 characters).

Each measurement is appended to the CSV as soon as it is taken; each failing case becomes an ``error`` row.
``--smoke`` runs the same code on CPU under the Triton interpreter with tiny shapes (a CI test).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: kernels defined under the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import gpu_cases as cases  # noqa: E402
from suite_report import Recorder, read_rows, table  # noqa: E402

from geffect_kernels.backends.registry import ALIASES, _load  # noqa: E402
from geffect_kernels.triton import set_logits_budget  # noqa: E402


def device():
    return torch.device("cpu" if SMOKE else "cuda")


def skipped_backend(check, dev):
    """Why ``check.backend`` cannot run here (None if it can); asks only that backend (no other builds)."""
    backend = _load(ALIASES.get(check.backend, check.backend))
    return None if backend is not None and backend.is_available(dev) else f"{check.backend} not available on {dev}"


# ------------------------------------------------------------------------------------------------ correctness
def correctness(rec):
    dev = device()
    for check in cases.correctness_checks():
        check = check.smoke() if SMOKE else check
        ids = dict(case=check.name, provider=check.backend, objective=check.objective, dtype=cases.NAMES[check.dtype])
        reason = skipped_backend(check, dev)
        if reason:
            rec.row(**ids, status="skipped", note=reason)
            continue
        with rec.case(**ids):
            loss_err, dh_err, dw_err, note, shape = cases.run_check(check, dev, SMOKE)
            tol_loss, tol_grad = check.tolerance
            ok = loss_err <= tol_loss and dh_err <= tol_grad and dw_err <= tol_grad
            rec.row(**ids, shape=shape, status="ok" if ok else "FAIL", loss_rel_err=loss_err, dh_rel_err=dh_err,
                    dw_rel_err=dw_err, tolerance=f"{tol_loss:g}/{tol_grad:g}", note=note)
    no_sync(rec, dev)


def no_sync(rec, dev):
    """Fused losses on the triton and cpp_cuda backends under `set_sync_debug_mode("error")`: a host sync raises."""
    n, h, v = (48, 32, 301) if SMOKE else (1024, 1024, 32000)
    dtype = torch.float32 if SMOKE else torch.bfloat16
    inputs = cases.make_inputs(n, h, v, "flat", dtype, dev)
    for backend in ("triton", "cpp_cuda"):
        reason = skipped_backend(cases.Check("no host sync", backend, "-", dtype), dev)
        if reason:
            rec.row(case="no host sync", provider=backend, objective="-", status="skipped", note=reason)
            continue
        no_sync_backend(rec, dev, inputs, backend, dtype, f"N={n},H={h},V={v}")


def no_sync_backend(rec, dev, inputs, backend, dtype, shape):
    for name, fn in cases.no_sync_calls(inputs, backend).items():
        ids = dict(case=f"no host sync: {name}", provider=backend, objective=name.split()[0],
                   dtype=cases.NAMES[dtype], shape=shape)
        with rec.case(**ids):
            hid = inputs.hidden.detach().requires_grad_()
            wt = inputs.weight.detach().requires_grad_()
            fn(hid, wt, None)  # warm-up: compiles, builds caches
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                fn(hid, wt, None).backward()
            finally:
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            rec.row(**ids, status="ok", note="no synchronizing call" if dev.type == "cuda" else "plumbing only")


# ------------------------------------------------------------------------------------------------------ speed
def measure(step, dev):
    """(median, p20, p80) ms and peak MiB above what was allocated before the call."""
    if dev.type != "cuda":
        t0 = time.perf_counter()
        step()
        ms = 1e3 * (time.perf_counter() - t0)
        return ms, ms, ms, float("nan")
    import triton.testing
    step()  # compile, warm caches
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    med, p20, p80 = triton.testing.do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80, peak


def fwd_bwd(fn, hidden, weight):
    def step():
        hidden.grad = weight.grad = None
        out = fn(hidden, weight, None)
        if isinstance(out, torch.Tensor):
            out.backward()
    return step


def speed(rec):
    dev = device()
    dtype = torch.float32 if SMOKE else torch.bfloat16
    for n, h, v, dist, full in cases.speed_shapes(SMOKE):
        shape = f"N={n},H={h},V={v},{dist}"
        with rec.case(case="inputs", shape=shape, provider="-", objective="-"):
            inputs = cases.make_inputs(n, h, v, dist, dtype, dev)
            hid, wt = inputs.hidden.detach().requires_grad_(), inputs.weight.detach().requires_grad_()
            with torch.no_grad():
                pmax = torch.softmax(inputs.hidden[:256].float() @ inputs.weight.float().T, -1).amax(-1).median()
            print(f"\n{shape}: median max-probability {pmax.item():.2e}", flush=True)
            for provider, objective, factory in cases.speed_providers(full):
                ids = dict(case="fwd+bwd", provider=provider, objective=objective, dtype=cases.NAMES[dtype],
                           shape=shape)
                try:
                    budget, make = factory()
                except ImportError as exc:
                    rec.row(**ids, status="skipped", note=f"not importable: {exc}"[:200])
                    continue
                with rec.case(**ids):
                    set_logits_budget(budget)
                    try:
                        med, p20, p80, peak = measure(fwd_bwd(make(inputs), hid, wt), dev)
                    finally:
                        set_logits_budget(0)
                    rec.row(**ids, status="ok", ms_median=med, ms_p20=p20, ms_p80=p80, peak_mib=peak)
            del inputs, hid, wt


# ------------------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["correctness", "speed", "overhead", "logits", "stats", "table"])
    parser.add_argument("--csv", required=True, help="the suite's CSV (rows are appended)")
    parser.add_argument("--parts", help="table: the shell's CSV of part exit codes and times")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args()
    if args.part == "table":
        print(table(read_rows(args.csv), read_rows(args.parts) if args.parts else ()))
        return
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (use --smoke for the CPU plumbing check)")
    rec = Recorder(args.csv, args.part)
    if args.part == "overhead":
        import api_overhead
        api_overhead.run(rec, device(), smoke=SMOKE)
    elif args.part == "logits":
        import gpu_logits_kernels
        gpu_logits_kernels.run(rec, device(), smoke=SMOKE)
    elif args.part == "stats":
        import gpu_token_stats
        gpu_token_stats.run(rec, device(), smoke=SMOKE)
    else:
        {"correctness": correctness, "speed": speed}[args.part](rec)


if __name__ == "__main__":
    main()
