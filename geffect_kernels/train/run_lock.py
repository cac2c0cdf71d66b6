"""One writer per run folder: an exclusive lock on ``<folder>/.lock`` for as long as a run lasts.

The lock is a ``flock``, which the kernel drops when its process ends, however it ends (``kill -9``
included): a lock file left behind by a dead run is never mistaken for a live one. The file's text (pid,
host, start time) only names the holder in the error a second writer gets.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process is writing to the run folder; the message names it."""


@contextlib.contextmanager
def run_lock(folder):
    """Hold ``folder``'s lock inside the ``with`` block (nothing when ``folder`` is None); RunFolderBusy when
    another process holds it."""
    if folder is None:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder / LOCK)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
        yield
    finally:
        # unlink while still holding it: a process that opened the old file finds it gone and retries
        Path(folder / LOCK).unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace") or "a process"
            os.close(fd)
            raise RunFolderBusy(f"{path.parent} is in use by another run ({holder}); wait for it to end or "
                                f"choose another output folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder we waited for removed this file: lock the new one
