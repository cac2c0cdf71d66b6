"""Per-call cost of the public API over the raw backend call, forward+backward of GA.

Three ways to the same loss: the backend's `weighted_loss` called directly (already-flat inputs, the scale
given), `unlearning_loss` (shape/dtype/device checks, flattening, 1/n_valid on the device) and
`unlearning_loss(check_values=True)` (also NaN/inf over hidden states and head, and the label range).
A small shape shows the fixed cost; a large head shows what the value checks read.

    python benchmarks/api_overhead.py      # CPU, torch backend: benchmarks/results/api_overhead.csv
    (the GPU suite's ``overhead`` part runs the same on CUDA with the triton backend)
"""
from __future__ import annotations

import pathlib
import statistics
import time

import torch

import geffect_kernels as gk
from geffect_kernels.backends.registry import get_backend
from geffect_kernels.backends.interface import LossOptions
from geffect_kernels.catalog import resolve

RESULTS = pathlib.Path(__file__).parent / "results" / "api_overhead.csv"


def _timed(step, dev, repeats):
    """Median and p20/p80 ms of ``repeats`` calls (after two warm-ups), each waited for on a GPU."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=5)
    return statistics.median(times), q[0], q[3]


def calls(backend, hidden, weight, labels):
    impl = get_backend(backend, hidden)
    n_valid = int((labels != -100).sum())

    def raw():
        impl.weighted_loss(hidden, weight, None, labels, None,
                           LossOptions(-100, None, resolve("ga", {}).weighting, 1.0 / n_valid)).backward()

    def api(**kw):
        return lambda: gk.unlearning_loss("ga", hidden, weight, labels, backend=backend, **kw).backward()

    return {"raw backend call": raw, "unlearning_loss": api(), "unlearning_loss check_values": api(check_values=True)}


def run(rec, dev, smoke=False):
    backend = "triton" if dev.type == "cuda" else "torch"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [(64, 32, 300)] if smoke else ([(256, 64, 1000), (1024, 4096, 128256)] if dev.type == "cuda"
                                            else [(64, 32, 300), (256, 1024, 32000)])
    for n, h, v in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(n, h, device=dev, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, device=dev, generator=g) / h**0.5).to(dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), device=dev, generator=g)
        labels[::7] = -100
        shape = f"N={n},H={h},V={v}"
        raw_ms = None
        for name, step in calls(backend, hidden, weight, labels).items():
            ids = dict(case="api overhead", provider=f"{backend}: {name}", objective="ga",
                       dtype=str(dtype)[6:], shape=shape)
            with rec.case(**ids):
                med, p20, p80 = _timed(step, dev, 3 if smoke else (50 if n * v < 10**6 else 7))
                raw_ms = med if raw_ms is None else raw_ms
                rec.row(**ids, status="ok", ms_median=med, ms_p20=p20, ms_p80=p80,
                        note=f"+{med - raw_ms:.3f} ms over the raw call ({med / raw_ms:.2f}x)")


if __name__ == "__main__":
    from suite_report import Recorder
    torch.set_num_threads(1)  # a shared machine: one thread times more steadily
    RESULTS.parent.mkdir(exist_ok=True)
    run(Recorder(RESULTS, "overhead"), torch.device("cpu"))
    print(f"appended to {RESULTS}")
