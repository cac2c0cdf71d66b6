"""`benchmarks/geffect_scaling.py`: its flop count (exact on known ops, the ones torch's registry lacks
included) and one tiny configuration end to end (CSV columns, the plot)."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import geffect_scaling  # noqa: E402


def test_counted_flops_of_known_ops():
    m, k, n = 5, 7, 3
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    assert geffect_scaling.counted_flops(lambda: a @ b) == 2 * m * k * n
    assert geffect_scaling.counted_flops(lambda: c.addmm_(a, b)) == 2 * m * k * n  # in place: not in the registry
    q, key, v = (torch.randn(2, 3, 6, 4, requires_grad=True) for _ in range(3))
    forward = geffect_scaling.counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, key, v))
    assert forward == 2 * (2 * 2 * 3 * 6 * 6 * 4)  # Q Kᵀ and P V
    both = geffect_scaling.counted_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, key, v).sum().backward())
    assert both > 2 * forward  # the backward (CPU flash attention) is counted too


def test_one_configuration_writes_the_csv_and_the_plot(tmp_path):
    out, plot = tmp_path / "scaling.csv", tmp_path / "scaling.png"
    done = subprocess.run([sys.executable, "benchmarks/geffect_scaling.py", "--tokens", "8", "--hidden", "64",
                           "--rounds", "1", "--out", str(out), "--plot", str(plot)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["method"]: r for r in csv.DictReader(open(out, newline=""))}
    assert set(rows) == {"step", "materialized", "profiler"} and plot.stat().st_size > 0
    assert float(rows["step"]["flops_vs_step"]) == 1.0
    assert 0 < float(rows["profiler"]["gflops"]) < float(rows["materialized"]["gflops"])
    assert float(rows["profiler"]["seconds"]) > 0 and rows["profiler"]["commit"]
    assert float(rows["materialized"]["vs_materialized"]) == pytest.approx(1.0)
