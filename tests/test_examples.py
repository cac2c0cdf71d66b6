"""The example programs under python/ run as the README says and print what they promise, so they cannot rot.
(python/sharded_geffects.py runs under torchrun in test_sharded_geffects.py.)"""
import os
import pathlib
import re
import subprocess
import sys

from geffect_kernels import OBJECTIVES
from test_cli import make_workspace

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"[-+]?\d+\.\d+(?:e[-+]\d+)?"


def run_example(name, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "python" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_objective_prints_a_finite_row_per_objective_and_the_retain_losses():
    out = run_example("every_objective.py")
    for name in [*OBJECTIVES, "kl", "rmu", "rr"]:
        assert re.search(rf"^{name}\s+{NUMBER}", out, re.M), f"no row for {name}:\n{out}"
    assert "nan" not in out and "inf" not in out


def test_unlearning_loop_lowers_the_forget_log_likelihood_and_logs_geffects():
    out = run_example("unlearning_loop.py")
    before, after = map(float, re.search(rf"log-prob: ({NUMBER}) -> ({NUMBER})", out).groups())
    assert after < before  # NPO pushed the forget set's likelihood down
    assert len(re.findall(r"^step\s+\d+\s+e_forget", out, re.M)) == 4  # every 5 of 20 steps


def test_profile_local_model_writes_its_csv_and_plot(tmp_path):
    w = make_workspace(tmp_path)
    run_example("profile_local_model.py", w / "model", w / "forget.json", w / "retain.json", tmp_path / "out")
    assert (tmp_path / "out" / "profile.png").stat().st_size > 0
    header, *rows = (tmp_path / "out" / "profile.csv").read_text().splitlines()
    assert rows and all(name in "\n".join(rows) for name in ("ga", "npo", "wga", "tnpo", "wtnpo")), header
