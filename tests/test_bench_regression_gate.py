"""The regression gate of benchmarks/README.md runs as written: a saved run (--benchmark-autosave) carries each
group's ratios, a rerun compared with it (--benchmark-compare) passes, and one compared with a run whose times were
made a thousand times smaller fails (--benchmark-compare-fail): the gate is decided by the saved statistics, not by
timing luck. Tiny shapes (GEFFECT_BENCH_QUICK=1)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ["benchmarks/test_api_overhead.py", "--benchmark-only", "-k", "cpu"]


def pytest(tmp_path, *args):
    env = {**os.environ, "GEFFECT_BENCH_QUICK": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE,
                           f"--benchmark-storage=file://{tmp_path}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_saved_run_gates_a_regression(tmp_path):
    saved = pytest(tmp_path, "--benchmark-autosave")
    assert saved.returncode == 0, saved.stdout[-2000:] + saved.stderr[-2000:]
    path, = tmp_path.glob("*/0001_*.json")
    data = json.loads(path.read_text())
    assert data["benchmarks"] and all(b["extra_info"]["vs_floor"] > 0 for b in data["benchmarks"])
    assert data["machine_info"]["libraries"]["torch"]
    same = pytest(tmp_path, "--benchmark-compare", "--benchmark-compare-fail=min:100000%")
    assert same.returncode == 0, same.stdout[-2000:]
    for b in data["benchmarks"]:  # a saved run a thousand times faster than anything this machine can do
        b["stats"] = {k: v / 1000 if isinstance(v, float) else v for k, v in b["stats"].items()}
    path.write_text(json.dumps(data))
    gated = pytest(tmp_path, "--benchmark-compare", "--benchmark-compare-fail=min:100%")
    assert gated.returncode != 0 and "Performance has regressed" in gated.stdout + gated.stderr
