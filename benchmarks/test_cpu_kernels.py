"""pytest-benchmark: the csrc CPU kernels against plain torch, both variants in the same run.

    python -m pytest benchmarks/test_cpu_kernels.py --benchmark-group-by=group

- logits-input token loss (GA), forward+backward, N 4096, V 32000, float32: torch eager (log_softmax +
  gather + backward) and the chunked ``torch`` backend vs the C++ row kernel writing the gradient in
  place, called through the public API (which validates the input first) and through the backend
  directly (the kernel alone); with each variant's peak memory beyond its input (fresh process);
- Gram ("ghost") inner product, Na = Nb = 3072, d_out = d_in = 1024, float32: two torch matmuls and an
  elementwise product vs the tiled kernel;
- token loss over a linear head (hidden states), N 1024, H 512, V 32000: the ``cpu`` backend vs the
  chunked ``torch`` backend (what ``auto`` chose before).

Minimum and median times and the speedups over the torch variant (from each) go to
benchmarks/results/cpu_kernels.csv with machine and commit. The machine is shared: the minimum is the
less disturbed figure.
"""
import csv
import subprocess
import sys
from pathlib import Path

import provenance
import pytest
import torch

import geffect_kernels as gk
from geffect_kernels.backends.cpp import build, ghost_inner_product
from geffect_kernels.backends.cpp.backend import BACKENDS
from geffect_kernels.weighting import TokenWeighting

RESULTS = Path(__file__).parent / "results" / "cpu_kernels.csv"
ROUNDS = 5
_rows = []


@pytest.fixture(scope="module", autouse=True)
def extension_and_csv():
    if not build.available("cpu"):
        pytest.skip(f"cpu extension unavailable: {build.build_error('cpu')}")
    yield
    write_csv(_rows)


def write_csv(rows):
    if not rows:
        return
    commit = provenance.commit()
    baselines = {r["kernel"]: r for r in rows if r["baseline"]}
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["kernel", "variant", "shape", "ms_min", "ms_median", "speedup_min",
                                    "speedup_median", "extra_peak_mib", "machine", "commit"])
        writer.writeheader()
        for r in rows:
            base = baselines.get(r["kernel"])
            writer.writerow({k: r[k] for k in ("kernel", "variant", "shape")} | {
                "ms_min": round(r["ms_min"], 1), "ms_median": round(r["ms_median"], 1),
                "speedup_min": round(base["ms_min"] / r["ms_min"], 2) if base else "",
                "speedup_median": round(base["ms_median"] / r["ms_median"], 2) if base else "",
                "extra_peak_mib": r.get("extra_peak_mib", ""), "machine": provenance.machine(), "commit": commit})


def record(benchmark, kernel, variant, shape, baseline, **extra):
    stats = benchmark.stats.stats
    _rows.append({"kernel": kernel, "variant": variant, "shape": shape, "ms_median": stats.median * 1e3,
                  "ms_min": stats.min * 1e3, "baseline": baseline, **extra})


_PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import test_cpu_kernels as bench
bench.N, bench.V = {n}, {v}
g = torch.Generator().manual_seed(0)
logits, labels = torch.randn(bench.N, bench.V, generator=g), torch.randint(0, bench.V, (bench.N,), generator=g)
bench.{fn}(torch.randn(3, 5), torch.tensor([0, 1, 2]))  # load the extension, start the threads
before = bench.peak_rss_mib()  # the peak so far: the logits
bench.{fn}(logits, labels)
print(bench.peak_rss_mib() - before)
"""


def peak_rss_mib():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (the benchmark process)
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def extra_peak_mib(fn):
    """Growth of the peak resident memory during one call beyond the inputs, in a fresh process."""
    script = _PEAK_SCRIPT.format(here=str(Path(__file__).parent), fn=fn.__name__, n=N, v=V)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return round(float(out.split()[-1]))


# -- logits-input token loss ---------------------------------------------------------------------
N, V = 4096, 32000


@pytest.fixture(scope="module")
def logits_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g) * 2, torch.randint(0, V, (N,), generator=g), torch.empty(N, V)


def eager_loss(logits, labels):
    logits.requires_grad_()
    loss = -torch.log_softmax(logits, -1).gather(1, labels[:, None]).mean()
    loss.backward()
    return loss


def api_loss(logits, labels):
    logits.requires_grad_()
    loss = gk.unlearning_loss_from_logits("ga", logits, labels, backend="cpu", inplace=True)
    loss.backward()
    return loss


def chunked_loss(logits, labels):
    logits.requires_grad_()
    loss = gk.unlearning_loss_from_logits("ga", logits, labels, backend="torch")
    loss.backward()
    return loss


def kernel_loss(logits, labels):
    logits.requires_grad_()
    loss = BACKENDS["cpp_cpu"].weighted_loss_from_logits(logits, labels, None, ignore_index=-100, softcap=None,
                                                     weighting=TokenWeighting("one"), scale=1.0 / N, inplace=True)
    loss.backward()
    return loss


@pytest.mark.parametrize("variant,fn", [("torch-eager", eager_loss), ("torch-backend-api", chunked_loss),
                                        ("csrc-inplace-api", api_loss), ("csrc-inplace-kernel", kernel_loss)])
def test_logits_loss_fwd_bwd(benchmark, logits_data, variant, fn):
    source, labels, buffer = logits_data
    benchmark.group = f"logits loss N{N} V{V} fp32"

    def fresh_logits():  # the in-place variants overwrite their input: refill outside the timing
        buffer.grad = None
        return (buffer.detach().copy_(source), labels), {}

    loss = benchmark.pedantic(fn, setup=fresh_logits, rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(loss)
    record(benchmark, "logits_loss_fwd_bwd", variant, f"N{N}_V{V}_fp32", variant == "torch-eager",
           extra_peak_mib=extra_peak_mib(fn))


# -- Gram inner product ----------------------------------------------------------------------------
NA = NB = 3072  # more than one 2048-row tile per side
D = 1024


@pytest.fixture(scope="module")
def gram_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, D, generator=g) for n in (NA, NA, NB, NB)]


def torch_gram(ga, xa, gb, xb):
    return ((ga @ gb.T) * (xa @ xb.T)).sum(dtype=torch.float64)


@pytest.mark.parametrize("variant,fn", [("torch-matmuls", torch_gram), ("csrc-tiled", ghost_inner_product)])
def test_gram_inner_product(benchmark, gram_data, variant, fn):
    benchmark.group = f"gram Na{NA} Nb{NB} d{D} fp32"
    out = benchmark.pedantic(fn, args=tuple(gram_data), rounds=ROUNDS, warmup_rounds=1)
    assert torch.isclose(out, torch_gram(*gram_data), rtol=1e-4)
    record(benchmark, "gram_inner_product", variant, f"Na{NA}_Nb{NB}_dout{D}_din{D}_fp32", variant == "torch-matmuls")


# -- token loss over a linear head ------------------------------------------------------------------
HN, HH = 1024, 512


@pytest.fixture(scope="module")
def head_data():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(HN, HH, generator=g)
    weight = (torch.randn(V, HH, generator=g) / HH**0.5).requires_grad_()
    return hidden.requires_grad_(), weight, torch.randint(0, V, (HN,), generator=g)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_head_loss_fwd_bwd(benchmark, head_data, backend):
    hidden, weight, labels = head_data
    benchmark.group = f"head loss N{HN} H{HH} V{V} fp32"

    def run():
        hidden.grad = weight.grad = None
        loss = gk.unlearning_loss("wga", hidden, weight, labels, backend=backend)
        loss.backward()
        return loss

    loss = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    record(benchmark, "head_loss_fwd_bwd", f"backend-{backend}", f"N{HN}_H{HH}_V{V}_fp32_wga", backend == "torch")
