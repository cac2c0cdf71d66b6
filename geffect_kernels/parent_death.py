"""Processes that end with their parent: ``geffect train --nproc``'s torchrun ends when the launcher dies, however
it dies (``kill -9``, the OOM killer), and each rank when torchrun does. Linux's ``PR_SET_PDEATHSIG`` has the
kernel send SIGTERM at the parent's death, which a rank meets as it meets ``timeout``'s (one line, the lock
released, the last complete checkpoint kept); elsewhere these ask nothing."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's ``prctl``, looked up before any fork (a child between fork and exec must not load libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def ending_with_this_process(sig=signal.SIGTERM):
    """A ``preexec_fn`` for `subprocess.Popen` that makes the child receive ``sig`` when this process dies (None
    where that cannot be asked)."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None

    def in_the_child():
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request: nobody will send the signal
            os._exit(128 + int(sig))
    return in_the_child


def end_with_torchrun(sig=signal.SIGTERM) -> bool:
    """In a rank of a torchrun group: receive ``sig`` when torchrun dies; end at once when it is already gone.
    False where the request cannot be made (not Linux)."""
    prctl = _prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        parent = b""
    if b"torch.distributed.run" not in parent and b"torchrun" not in parent:  # adopted: torchrun died already
        os._exit(128 + int(sig))
    return True
