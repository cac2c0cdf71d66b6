"""Fault injection: `geffect train` killed with SIGKILL at random points, once inside the checkpoint write,
then rerun to the end, equals a run never interrupted bit for bit, and leaves no temporary file or lock."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from test_cli import workspace  # noqa: F401  (a fixture: a tiny model folder and TOFU files)

# The command, with one test hook: PAUSE_IN_CHECKPOINT_WRITE=FILE makes the first checkpoint write of the
# process stop halfway (half the bytes in the temporary file), touch FILE and wait to be killed.
COMMAND = """
import io, os, sys, time
import torch
marker = os.environ.get("PAUSE_IN_CHECKPOINT_WRITE")
if marker:
    real_save = torch.save
    def half_then_wait(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        open(marker, "w").close()
        time.sleep(600)
    torch.save = half_then_wait
from geffect_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""
STEPS = 8
TIMEOUT = 300  # seconds for any one wait: a busy 2-core machine imports torch slowly


def start(workspace, out, **env):
    argv = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--objective", "npo", "--steps", STEPS, "--batch-size", 4, "--lr", "3e-3",
            "--geffect-every", 3, "--config", workspace / "every_2.yaml", "--out", out, "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd()), **env}
    return subprocess.Popen([sys.executable, "-c", COMMAND, *map(str, argv)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, process, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            return False  # ended first (it ran to the end): nothing to kill
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return True


def last_logged_step(run):
    path = run / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return max(steps)


def test_killed_runs_resume_bit_identical(workspace, tmp_path):
    (workspace / "every_2.yaml").write_text("checkpoint_every: 2\n")
    straight = start(workspace, tmp_path / "straight")  # runs beside the killed ones
    out = tmp_path / "killed"
    run = out / "runs" / "npo"
    rng = random.Random(11)
    kills = []
    for attempt in range(3):
        if attempt == 0:  # inside the first checkpoint write (first: a fast run may end before a later kill)
            marker = tmp_path / "paused"
            process = start(workspace, out, PAUSE_IN_CHECKPOINT_WRITE=str(marker))
            assert wait_until(marker.exists, process, "the checkpoint write"), process.communicate()[0]
            assert list(run.glob(".checkpoint.pt.*.tmp")), "the kill is not inside the write"
            where = "inside the checkpoint write"
        else:  # a random step later than any logged so far, and a random fraction of a step (if still running)
            target = rng.randint(min(last_logged_step(run) + 1, STEPS - 2), STEPS - 2)
            process = start(workspace, out)
            wait_until(lambda: last_logged_step(run) >= target, process, f"step {target}")
            time.sleep(rng.uniform(0, 0.05))  # a fraction of a step, even on a fast machine
            where = f"after step {target} + a random delay"
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append((where, last_logged_step(run), (run / ".lock").exists()))
    final = start(workspace, out)
    log, _ = final.communicate(timeout=TIMEOUT)
    assert final.returncode == 0, log
    log_straight, _ = straight.communicate(timeout=TIMEOUT)
    assert straight.returncode == 0, log_straight

    reference = tmp_path / "straight" / "runs" / "npo"
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), kills
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                          for line in path.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(reference / "metrics.jsonl"), kills
    assert (run / "geffects.json").read_text() == (reference / "geffects.json").read_text()
    assert not list(run.glob(".*.tmp")) and not (run / ".lock").exists(), sorted(p.name for p in run.iterdir())
    print("kills (where, logged steps after the kill, lock file left):", kills)
