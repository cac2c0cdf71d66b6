"""The GPU suite's plumbing on CPU (`run_gpu_suite.sh --smoke`: the gpu-marked benchmark tests, Triton interpreted,
tiny shapes): every part exits 0, every timed part saves its JSON with the machine, the library versions and each
group's ratios, the table fits a device call's output, so the suite cannot rot between GPU sessions."""
import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "OUT": str(out), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_suite.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    return out, done


def results(out, part):
    return json.loads((out / f"gpu_suite_{part}.json").read_text())


def test_every_part_runs_and_exits_zero(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "gpu_suite_parts.csv", newline="") as f:
        parts = {r["part"]: r["exit"] for r in csv.DictReader(f)}
    assert set(parts) == {"build", "correctness", "fused", "overhead", "logits", "stats", "compiled",
                          "head_adapter"}
    assert all(code == "0" for code in parts.values()), (parts, (out / "gpu_suite.log").read_text()[-4000:])


def test_correctness_cases_ran_and_passed(smoke):
    out, _ = smoke
    log = (out / "gpu_suite.log").read_text()
    correctness = log[log.index("== correctness"):log.index("== correctness:")]
    summary = correctness.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 30  # fused losses, no-sync calls, token_stats, logits


def test_timed_parts_carry_ratios_machine_and_versions(smoke):
    out, _ = smoke
    fused = results(out, "fused")
    assert fused["machine_info"]["libraries"]["torch"] and fused["run_info"]["geffect_commit"]
    groups = {}
    for b in fused["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    assert len(groups) == 7  # ga, wga, tnpo, npo, kl, undial, ceu
    for members in groups.values():
        assert sum(b["extra_info"].get("role") == "floor" for b in members) == 1
        assert all(b["extra_info"]["vs_floor"] > 0 and "vs_naive" in b["extra_info"] for b in members)
    providers = {b["extra_info"]["provider"] for b in fused["benchmarks"]}
    assert providers >= {"floor: 3 matmuls", "naive eager", "torch", "triton lean", "triton fast"}
    for part in ("overhead", "logits", "stats"):
        assert results(out, part)["benchmarks"], part


def test_compiled_and_head_adapter_rows_carry_their_ratios_and_errors(smoke):
    out, _ = smoke
    compiled = {b["extra_info"]["mode"]: b["extra_info"] for b in results(out, "compiled")["benchmarks"]}
    assert set(compiled) == {"eager", "compiled"} and compiled["eager"]["role"] == "floor"
    assert compiled["compiled"]["vs_floor"] > 0 and compiled["compiled"]["err_dW"] <= 1e-4
    head = {b["extra_info"]["provider"]: b["extra_info"] for b in results(out, "head_adapter")["benchmarks"]}
    assert len(head) == 3 and sorted(i.get("role", "") for i in head.values()) == ["", "floor", "naive"]
    fused = head["fused, adapter on the head"]
    assert fused["vs_floor"] > 0 and fused["vs_naive"] > 0 and max(fused[f"err_{k}"] for k in
                                                                    ("loss", "dA", "dB", "dh")) <= 1e-4


def test_table_fits_the_output_tail(smoke):
    out, done = smoke
    text = (out / "gpu_suite_table.txt").read_text()
    assert 0 < len(text) <= 12_000
    assert "floor" in text and "fused kl" in text
    assert text.strip().splitlines()[0] in done.stdout
