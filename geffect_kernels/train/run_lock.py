"""One writer per run folder: an exclusive lock on ``<folder>/.lock`` for as long as a run lasts.

The lock is a ``flock``, which the kernel drops when its process ends, however it ends (``kill -9``
included): a lock file left behind by a dead run is never mistaken for a live one. The file's text (pid,
host, start time) only names the holder in the error a second writer gets.

The lock file is only ever written when this process created it (``O_EXCL``), and opened without following a
symbolic link (``O_NOFOLLOW``): a ``.lock`` planted as a link or a hard link to another file cannot make a run
overwrite that file. A stale lock file (its run was killed) is unlinked, not truncated, and made anew.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import time
from pathlib import Path

LOCK = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process is writing to the run folder; the message names it."""


@contextlib.contextmanager
def run_lock(folder):
    """Hold ``folder``'s lock inside the ``with`` block (nothing when ``folder`` is None); RunFolderBusy when
    another process holds it, ValueError when ``.lock`` is not a regular file."""
    if folder is None:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _acquire(folder / LOCK)
    try:
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
        yield
    finally:
        # unlink while still holding it: a process that opened the old file finds it gone and retries
        Path(folder / LOCK).unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path) -> int:
    """A descriptor of a lock file this process created and holds the ``flock`` of."""
    while True:
        created, fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace") or "a process"
            os.close(fd)
            raise RunFolderBusy(f"{path.parent} is in use by another run ({holder}); wait for it to end or "
                                f"choose another output folder") from None
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if created and current == os.fstat(fd).st_ino:
            return fd
        if not created and current == os.fstat(fd).st_ino:
            path.unlink()  # a stale lock file (its run died): held now, so nobody else is writing; make a new one
        os.close(fd)  # removed meanwhile by the holder we waited for, or stale: lock a file of our own


def _open(path: Path) -> tuple[bool, int]:
    """(created, descriptor): a new lock file, else the existing one, never through a symbolic link."""
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return True, os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return _open(path)  # removed between the two opens
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link: refusing to use it as the run's lock file (remove it)") \
                from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file: refusing to use it as the run's lock file (remove it)")
    return False, fd
