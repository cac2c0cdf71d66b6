"""The large-model GPU runs' plumbing on CPU (`run_gpu_large.sh --smoke`, tiny shape): every part exits 0, the
profiler check passes, every method leaves a timed benchmark with its ratios, the memory step trains every adapter
and records its peak beside the plan's, so the script is ready for the next lent GPU."""
import csv
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_large_model_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_large.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "gpu_large_parts.csv", newline="") as f:
        parts = {r["part"]: r["exit"] for r in csv.DictReader(f)}
    assert parts == {"geffect": "0", "fsdp": "0", "memory": "0"}, (tmp_path / "gpu_large.log").read_text()[-4000:]
    geffect = json.loads((tmp_path / "gpu_large_geffect.json").read_text())["benchmarks"]
    assert {b["extra_info"]["method"] for b in geffect} == {"step", "materialized", "measure_unlearning", "measure"}
    assert all(b["extra_info"]["vs_floor"] > 0 and b["extra_info"]["vs_materialized"] > 0 for b in geffect)
    fsdp = json.loads((tmp_path / "gpu_large_fsdp.json").read_text())["benchmarks"]
    assert {b["extra_info"]["mode"] for b in fsdp} == {"single process", "FSDP2, 1 rank"}
    memory = json.loads((tmp_path / "gpu_large_memory.json").read_text())["benchmarks"]
    assert len(memory) == 1 and memory[0]["extra_info"]["every_lora_b_moved"] is True
    assert memory[0]["extra_info"]["peak_mib"] > 0 and memory[0]["extra_info"]["plan_mib"] > 0
    log = (tmp_path / "gpu_large.log").read_text()
    assert "test_geffect_bf16_fast_path_against_float32_materialized" not in log  # passed: no FAILED line names it
    table = (tmp_path / "gpu_large_table.txt").read_text()
    assert "FSDP2, 1 rank" in table and "measure_unlearning" in table and table.strip().splitlines()[0] in done.stdout
