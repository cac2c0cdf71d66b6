"""`geffect train --nproc 2` stopped by SIGTERM or Ctrl-C: every rank stops, one line, a folder the same command
resumes; a crafted or torn checkpoint file after launch is one line too, and nothing in it runs."""
import json
import os
import pickle
import shutil
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


def start(workspace, out, **env):
    argv = ["train", "--config", workspace / "run.yaml", "--out", out, "--no-progress", "--nproc", 2]
    return subprocess.Popen([sys.executable, "-m", "geffect_kernels", *map(str, argv)], env={**rank_env(), **env},
                            cwd=ROOT,
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


def wait_for_files(process, paths):
    """Until every one of ``paths`` exists (each rank paused), with the run still going."""
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and time.monotonic() < deadline and not all(p.exists() for p in paths):
        time.sleep(0.05)
    assert process.poll() is None and all(p.exists() for p in paths), f"no pause: {finish(process)}"


def gone(out) -> bool:
    deadline = time.monotonic() + 30  # reaped a moment after they exit
    while processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not processes_of(out)


def children(pid) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def running(pid) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie waiting to be reaped has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_launcher_killed_with_sigkill_takes_torchrun_and_every_rank_along(workspace, tmp_path):
    out, paused = tmp_path / "run", tmp_path / "paused"
    paused.mkdir()
    process = start(workspace, out, GEFFECT_TEST_PAUSE=f"2:{paused}")
    wait_for_files(process, [paused / "paused-0", paused / "paused-1"])
    torchrun = children(process.pid)
    ranks = [pid for parent in torchrun for pid in children(parent)]
    assert len(torchrun) == 1 and len(ranks) == 2, (torchrun, ranks)
    argv = Path(f"/proc/{torchrun[0]}/cmdline").read_bytes().decode().split("\0")
    logs = Path(argv[argv.index("--log-dir") + 1])  # a launcher killed this way cannot remove its ranks' logs
    process.kill()  # what the OOM killer does: no handler runs, nothing is forwarded
    process.wait()
    deadline = time.monotonic() + 120  # torchrun gives its ranks 30 s after SIGTERM before it kills them
    while any(running(pid) for pid in torchrun + ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in torchrun + ranks if running(pid)]
    for pid in left:  # not to leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(logs, ignore_errors=True)
    assert not left, f"still running after the launcher's SIGKILL: {left} of torchrun {torchrun}, ranks {ranks}"
    run = out / "runs" / "ga"
    assert not (run / ".lock").exists() and not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((run / "checkpoint" / "latest.json").read_text())["step"] == 2


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_signals_stop_every_rank_and_the_run_resumes_then_crafted_files_are_one_line(workspace, tmp_path):
    out = tmp_path / "run"
    run = out / "runs" / "ga"
    latest = run / "checkpoint" / "latest.json"
    for sig, status, said, pause_at in [(signal.SIGTERM, 143, "geffect: stopped by SIGTERM; ", 2),
                                        (signal.SIGINT, 130, "geffect: stopped by Ctrl-C (SIGINT); ", 4)]:
        # every rank waits after step `pause_at`'s checkpoint until the signal comes: the run cannot end first
        paused = tmp_path / f"paused-{sig.name}"
        paused.mkdir()
        process = start(workspace, out, GEFFECT_TEST_PAUSE=f"{pause_at}:{paused}")
        wait_for_files(process, [paused / "paused-0", paused / "paused-1"])
        assert json.loads(latest.read_text())["step"] == pause_at
        process.send_signal(sig)  # to the launcher alone, as `timeout` or a terminal sends it
        _, err = finish(process)
        assert process.returncode == status and err.startswith(said) and err.count("\n") == 1, err
        assert gone(out), f"still running after {sig.name}: {processes_of(out)}"
        assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")] and not (run / ".lock").exists()
    process = start(workspace, out)
    stdout, err = finish(process)
    assert process.returncode == 0, err
    resumed = int(stdout.split("resumed from step ")[1].split(")")[0])
    assert resumed == 4 and f"ga: {STEPS} steps" in stdout, stdout
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest.json", f"step-{STEPS}"]
    crafted_or_torn_files_are_one_line_after_launch(workspace, out, tmp_path / "code_ran")


def crafted_or_torn_files_are_one_line_after_launch(workspace, out, marker):
    """A crafted index (its unpickling would create ``marker``), one rank's torn RNG state, settings of the wrong
    type: every rank stops with the same one line; latest.json without a world size is refused before launch."""
    step = out / "runs" / "ga" / "checkpoint" / f"step-{STEPS}"
    originals = {name: (step / name).read_bytes() for name in (".metadata", "rng-1.pt", "loop.json")}
    for name, content, message in [
        (".metadata", pickle.dumps(_RunsCode(marker)), "holds objects other than tensors and plain data"),
        ("rng-1.pt", originals["rng-1.pt"][:40], "rng-1.pt cannot be read"),
        ("loop.json", json.dumps({"step": STEPS, "settings": [1, 2]}).encode(),
         "loop.json: settings must map each setting to its value, got [1, 2]"),
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
