"""``geffect train --nproc N``: the same command under torchrun, N processes on this machine."""
from __future__ import annotations

import os
import subprocess
import sys


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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "geffect_kernels", *without_nproc(argv)]
    return subprocess.run(command, check=False).returncode
