"""`geffect train --nproc 2` stopped by SIGTERM or Ctrl-C: every rank stops, one line, a folder the same command
resumes; a crafted or torn checkpoint file after launch is one line too, and nothing in it runs."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranks import ROOT, rank_env
from test_cli import make_workspace, write_run_yaml

TIMEOUT = 600  # a hang, not a slow machine: CI shares its cores
STEPS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("signals"))
    return write_run_yaml(root, objective="ga", steps=STEPS, lr=0.01, batch_size=4, checkpoint_every=2, backend="torch")


def start(workspace, out):
    argv = ["train", "--config", workspace / "run.yaml", "--out", out, "--no-progress", "--nproc", 2]
    return subprocess.Popen([sys.executable, "-m", "geffect_kernels", *map(str, argv)], env=rank_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process):
    try:
        return process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def processes_of(out) -> list[int]:
    """Processes whose command line names ``out`` (the launcher, torchrun, the ranks)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def gone(out) -> bool:
    deadline = time.monotonic() + 30  # reaped a moment after they exit
    while processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not processes_of(out)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_signals_stop_every_rank_and_the_run_resumes_then_crafted_files_are_one_line(workspace, tmp_path):
    out = tmp_path / "run"
    run = out / "runs" / "ga"
    latest = run / "checkpoint" / "latest.json"
    for sig, status, said in [(signal.SIGTERM, 143, "geffect: stopped by SIGTERM; "),
                              (signal.SIGINT, 130, "geffect: stopped by Ctrl-C (SIGINT); ")]:
        process = start(workspace, out)
        deadline = time.monotonic() + TIMEOUT
        seen = json.loads(latest.read_text())["step"] if latest.is_file() else 0
        while process.poll() is None and time.monotonic() < deadline and \
                (json.loads(latest.read_text())["step"] if latest.is_file() else 0) <= seen:
            time.sleep(0.05)
        assert process.poll() is None, f"ended before the signal: {finish(process)}"
        process.send_signal(sig)  # to the launcher alone, as `timeout` or a terminal sends it
        _, err = finish(process)
        assert process.returncode == status and err.startswith(said) and err.count("\n") == 1, err
        assert gone(out), f"still running after {sig.name}: {processes_of(out)}"
        assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")] and not (run / ".lock").exists()
    process = start(workspace, out)
    stdout, err = finish(process)
    assert process.returncode == 0, err
    resumed = int(stdout.split("resumed from step ")[1].split(")")[0])
    assert resumed >= 4 and f"ga: {STEPS} steps" in stdout, stdout
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest.json", f"step-{STEPS}"]
    crafted_or_torn_files_are_one_line_after_launch(workspace, out, tmp_path / "code_ran")


def crafted_or_torn_files_are_one_line_after_launch(workspace, out, marker):
    """A crafted index (its unpickling would create ``marker``), one rank's torn RNG state: every rank stops with the
    same one line; latest.json without a world size is refused before launch."""
    step = out / "runs" / "ga" / "checkpoint" / f"step-{STEPS}"
    originals = {name: (step / name).read_bytes() for name in (".metadata", "rng-1.pt")}
    for name, content, message in [
        (".metadata", pickle.dumps(_RunsCode(marker)), "holds objects other than tensors and plain data"),
        ("rng-1.pt", originals["rng-1.pt"][:40], "rng-1.pt cannot be read"),
    ]:
        (step / name).write_bytes(content)
        process = start(workspace, out)
        _, err = finish(process)
        assert process.returncode == 1 and err.count("\n") == 1 and err.startswith("geffect: error: "), err
        assert message in err, err
        (step / name).write_bytes(originals[name])
    assert not marker.exists() and gone(out)
    latest = out / "runs" / "ga" / "checkpoint" / "latest.json"
    latest.write_text(json.dumps({"step": STEPS}))
    process = start(workspace, out)
    _, err = finish(process)
    assert process.returncode == 1 and err.count("\n") == 1 and "latest.json must name a step and a world size" in err
