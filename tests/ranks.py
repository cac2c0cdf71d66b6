"""Run a script on several ranks (gloo, CPU) for the distributed tests: a timeout for the whole group, and on
failure an error naming each rank that failed, its exit status and the end of its own stderr."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank=None, world=None, port=None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONFAULTHANDLER": "1"}
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def wait_all(procs, timeout, what) -> list[str]:
    """Wait for ``procs`` (one per rank); their stdout, or AssertionError naming the ranks that failed."""
    deadline = time.monotonic() + timeout
    outputs = [None] * len(procs)
    timed_out = False
    for rank, proc in enumerate(procs):
        try:
            outputs[rank] = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:  # SIGABRT first: faulthandler prints where each rank was stuck
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGABRT)
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=10))
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs.append(proc.communicate())
    failures = [f"rank {rank}: "
                f"{'killed after the timeout' if timed_out and proc.returncode < 0 else f'exit {proc.returncode}'}"
                f"\n{_tail(err)}" for rank, (proc, (_, err)) in enumerate(zip(procs, outputs))
                if proc.returncode != 0]
    if timed_out or failures:
        raise AssertionError(f"{what}: {'timed out after %ss; ' % timeout if timed_out else ''}"
                             + "\n".join(failures))
    return [out for out, _ in outputs]


def run_ranks(args, world=2, timeout=120) -> list[str]:
    """Run ``python *args`` as ranks 0..world-1 of one gloo group (as torchrun would); their stdout."""
    port = free_port()
    args = [str(a) for a in args]
    procs = [subprocess.Popen([sys.executable, *args], env=rank_env(rank, world, port), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    return wait_all(procs, timeout, f"python {' '.join(args[:3])} ... on {world} ranks")


def _tail(text, lines=15):
    return "\n".join((text or "").strip().splitlines()[-lines:])
