"""``geffect train --nproc N``: the same command under torchrun, N processes on this machine.

torchrun and its ranks run in a process group of their own. Ctrl-C or SIGTERM to this launcher (what ``timeout``,
systemd and Slurm send) goes to that whole group as SIGTERM, so every rank stops (each releases the run folder as
one process does; the folder keeps its last complete checkpoint), and the launcher waits for them. A launcher
that dies without a word (``kill -9``, the OOM killer) takes them along: torchrun receives SIGTERM at its death,
each rank at torchrun's (`parent_death`). Each rank's stderr goes to a log file; the launcher prints rank 0's, or
on a failure the one ``geffect:`` line a rank printed (an error before a "stopped by" of a rank torchrun stopped;
rank 0's, else the first failing rank's), never torchrun's tracebacks. The logs are removed, unless a rank failed
without such a line: then the line names the exception and the log it is kept in.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..parent_death import ending_with_this_process

STOP_GRACE_SECONDS = 120  # after SIGTERM: how long the ranks get to stop before SIGKILL


def world_size() -> int:
    """The number of processes of the torchrun group this process belongs to (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(argv: list[str], nproc: int) -> int:
    """Run ``python -m geffect_kernels argv`` on ``nproc`` local processes (torchrun, a free port); its exit code."""
    logs = Path(tempfile.mkdtemp(prefix="geffect-ranks-"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--log-dir", str(logs), "--redirects", "2", "-m", "geffect_kernels", *without_nproc(argv)]
    # torchrun receives SIGTERM when this process dies, even by SIGKILL (its ranks, likewise, when it does)
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "GEFFECT_LAUNCHED": "1"}, preexec_fn=ending_with_this_process())
    stopped = None
    try:
        _, launcher_err = process.communicate()
    except KeyboardInterrupt as signalled:  # Ctrl-C, or SIGTERM (raised the same way by `cli`)
        stopped = signalled
        _, launcher_err = _stop(process)
    code = process.returncode
    if stopped is not None:
        shutil.rmtree(logs, ignore_errors=True)
        raise stopped  # the caller says, once, how the run stopped
    if code == 0:
        sys.stderr.write(_read(_rank_logs(logs).get(0)))
        shutil.rmtree(logs, ignore_errors=True)
        return 0
    print(failure_line(logs, code, launcher_err), file=sys.stderr)
    return code if code > 0 else 128 - code


def failure_line(logs: Path, code: int, launcher_err: str) -> str:
    """The one line a failed run says: a rank's ``geffect:`` line, else the last line of the first rank's
    traceback and where its log is (the one case the logs are kept), else torchrun's last line. The logs folder
    is removed unless the line points to it."""
    paths = _rank_logs(logs)
    rank_errs = {rank: _read(path) for rank, path in paths.items()}
    line = _one_line(rank_errs)
    failed = next((rank for rank, text in sorted(rank_errs.items()) if "Traceback" in text), None)
    if line is None and failed is not None:
        last = rank_errs[failed].strip().splitlines()[-1]
        return f"geffect: error: rank {failed} failed: {last}; its log (kept): {paths[failed]}"
    shutil.rmtree(logs, ignore_errors=True)
    return line or (f"geffect: error: torchrun ended with exit status {code} "
                    f"({(launcher_err.strip().splitlines() or ['no message'])[-1]})")


def _read(path: Path | None) -> str:
    try:
        return path.read_text(errors="replace") if path is not None else ""
    except OSError:
        return ""


def _stop(process):
    """SIGTERM to torchrun's group (it and every rank), then wait; SIGKILL after `STOP_GRACE_SECONDS`."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C while the ranks stop is not a traceback
        signal.signal(sig, signal.SIG_IGN)
    _signal_group(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        return process.communicate()


def _signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _rank_logs(logs: Path) -> dict[int, Path]:
    """{local rank: its stderr log} under torchrun's ``--log-dir``."""
    return {int(path.parent.name): path for path in logs.rglob("stderr.log") if path.parent.name.isdigit()}


def _one_line(rank_errs: dict) -> str | None:
    """The ``geffect: error:`` line of rank 0, else of the first rank that printed one; else any ``geffect:`` line,
    rank 0's first. An error comes before a stop: when one rank fails, torchrun stops the others with SIGTERM, and
    each of those says it was stopped."""
    for prefix in ("geffect: error: ", "geffect: "):
        for _, text in sorted(rank_errs.items()):
            lines = [line for line in text.splitlines() if line.startswith(prefix)]
            if lines:
                return lines[-1]
    return None
