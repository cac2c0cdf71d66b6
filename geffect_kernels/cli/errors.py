"""What the command says on bad input: one line ``geffect: error: ...`` and exit status 1."""
from __future__ import annotations

import re
import sys

EXIT_ERROR = 1


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class OutOfMemory(RuntimeError):
    """torch ran out of memory (host or device): bad input for this machine, not a bug."""


# what torch says when an allocation fails: the device's "out of memory", the host's DefaultCPUAllocator
# "can't allocate memory" (Linux) or "not enough memory" (Windows)
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
_HOST_REQUEST = re.compile(r"DefaultCPUAllocator: .*?you tried to allocate (\d+) bytes")


def out_of_memory(err) -> OutOfMemory | None:
    """``err`` as an OutOfMemory when it is one (torch raises RuntimeError subclasses or MemoryError)."""
    text = str(err)
    if not (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or
            isinstance(err, RuntimeError) and any(words in text.lower() for words in _OUT_OF_MEMORY)):
        return None
    host = _HOST_REQUEST.search(text)
    what = f"the CPU's memory cannot hold {_size(int(host.group(1)))} more" if host else first_line(err)
    return OutOfMemory(f"out of memory ({what}); lower --batch-size or --max-length (with an adapter, --lora-r), "
                       f"or use a machine with more memory")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.4g} {unit}"
        count /= 1024
    return f"{count:.4g} TiB"


def user_errors() -> tuple:
    """The exceptions that are bad input, printed as one line. ValueError covers bad data (DataError), settings,
    checkpoints (CheckpointError, ResumeMismatch). The package's own are looked up only where their module was
    imported: an exception of a module never imported cannot have been raised."""
    errors = [CLIError, ValueError, OSError]
    if "geffect_kernels.train" in sys.modules:
        from ..train import RunFolderBusy, TrainingDiverged
        errors += [RunFolderBusy, TrainingDiverged]
    if "geffect_kernels.backends.registry" in sys.modules:
        from ..backends.registry import BackendUnavailable
        errors.append(BackendUnavailable)
    return tuple(errors)
