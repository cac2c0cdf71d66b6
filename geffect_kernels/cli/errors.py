"""What the command says on bad input: one line ``geffect: error: ...`` and exit status 1."""
from __future__ import annotations

import sys

EXIT_ERROR = 1


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class OutOfMemory(RuntimeError):
    """torch ran out of memory (host or device): bad input for this machine, not a bug."""


def out_of_memory(err) -> OutOfMemory | None:
    """``err`` as an OutOfMemory when it is one (torch raises RuntimeError subclasses or MemoryError)."""
    text = str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or \
            isinstance(err, RuntimeError) and ("not enough memory" in text or "out of memory" in text.lower()):
        return OutOfMemory(f"out of memory ({first_line(err)}); lower --batch-size or --max-length, or use a "
                           f"machine with more memory")
    return None


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
