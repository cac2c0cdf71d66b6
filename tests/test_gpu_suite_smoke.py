"""The GPU suite's plumbing on CPU (`run_gpu_suite.sh --smoke`): every part runs and exits 0, every case leaves a
row, the Triton interpreter's float32 cases pass their tolerances, the table fits a device call's output, so
the script cannot rot between GPU sessions."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "OUT": str(out), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_suite.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return out, done


def test_every_part_runs_and_exits_zero(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = {r["part"]: r for r in rows(out / "gpu_suite_parts.csv")}
    assert set(parts) >= {"build", "correctness", "speed", "overhead", "logits", "stats"}
    failed = {p: r["exit"] for p, r in parts.items() if r["exit"] != "0"}
    assert not failed, f"parts failed: {failed}\n" + (out / "gpu_suite.log").read_text()[-4000:]


def test_rows_for_every_case_and_no_errors(smoke):
    out, _ = smoke
    table = rows(out / "gpu_suite.csv")
    errors = [r for r in table if r["status"] == "error"]
    assert not errors, errors
    assert all(r["machine"] and r["commit"] and r["utc"] for r in table)
    checks = [r for r in table if r["part"] == "correctness" and r["provider"] == "triton"
              and not r["case"].startswith("no host sync")]
    assert len(checks) >= 15
    assert all(r["dtype"] == "fp32" and r["status"] == "ok" for r in checks), [r for r in checks if r["status"] != "ok"]
    fast = [r for r in checks if "fast" in r["case"]]  # the fast cases did run the fast mode (KL's too)
    assert any(r["objective"] == "kl" for r in fast) and all(r["note"].startswith("fast") for r in fast), fast
    timed = [r for r in table if r["part"] == "speed" and r["status"] == "ok"]
    assert {r["provider"] for r in timed} >= {"floor: 3 bf16 matmuls", "triton lean", "triton fast", "torch chunked"}
    assert {r["provider"] for r in timed if r["objective"] == "kl"} >= {"triton lean", "triton fast"}
    assert all(float(r["ms_median"]) > 0 for r in timed)
    assert any(r["part"] == "overhead" and r["status"] == "ok" for r in table)
    stats = [r for r in table if r["part"] == "stats" and r["provider"] == "triton"]
    assert len(stats) >= 4 and all(r["status"] == "ok" and float(r["dw_rel_err"]) <= 5e-5 for r in stats), stats


def test_table_fits_the_output_tail(smoke):
    out, done = smoke
    text = (out / "gpu_suite_table.txt").read_text()
    assert 0 < len(text) <= 12_000
    assert "correctness vs float64" in text and "x3mm" in text
    assert text.strip() in done.stdout
