"""The large-model GPU runs' plumbing on CPU (`run_gpu_large.sh --smoke`, tiny shape): every part exits 0, the
profiler check passes, every method leaves a timed row and the table shows them, the memory step trains every
adapter and leaves its row beside the plan's, so the script is ready for the next lent GPU."""
import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_large_model_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_large.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "gpu_large_parts.csv", newline="") as f:
        parts = {r["part"]: r["exit"] for r in csv.DictReader(f)}
    assert parts == {"geffect": "0", "fsdp": "0", "memory": "0"}, (tmp_path / "gpu_large.log").read_text()[-4000:]
    with open(tmp_path / "gpu_large.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert not [r for r in rows if r["status"] != "ok"], rows
    checks = [r for r in rows if r["case"].startswith("check")]
    assert len(checks) == 2 and all(float(r["loss_rel_err"]) < 1e-5 for r in checks)
    timed = {(r["part"], r["case"]) for r in rows if r["ms_median"]}
    assert timed == {("geffect", m) for m in ("train_step", "measure_unlearning", "measure", "materialized")} | {
        ("fsdp", "single process"), ("fsdp", "FSDP2, 1 rank")}
    with open(tmp_path / "gpu_large_memory.csv", newline="") as f:
        memory = list(csv.DictReader(f))
    assert len(memory) == 1 and memory[0]["status"] == "ok" and memory[0]["every_lora_b_moved"] == "True"
    assert float(memory[0]["peak_mib"]) > 0 and float(memory[0]["plan_mib"]) > 0
    table = (tmp_path / "gpu_large_table.txt").read_text()
    assert "FSDP2, 1 rank" in table and "measure_unlearning" in table and table.strip() in done.stdout
