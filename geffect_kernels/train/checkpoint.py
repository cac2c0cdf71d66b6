"""The run folder's checkpoint, written atomically (`atomic_files`, whose writers are re-exported here).

A file written here is either the old complete file or the new complete file, never half of one, whenever
the process is killed; what a kill can leave is a temporary ``.NAME.*.tmp`` beside it, which the next run
in the folder removes (`remove_orphans`). A checkpoint is loaded as tensors and plain data only
(``weights_only``): a crafted file in a run folder is refused, never executed.
"""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import torch

from ..atomic_files import atomic_write as atomic_write
from ..atomic_files import atomic_write_json as atomic_write_json
from ..atomic_files import atomic_write_text as atomic_write_text
from ..structured_files import UnreadableFile, read_json

CHECKPOINT = "checkpoint.pt"  # one process's checkpoint: one file
SHARDED_CHECKPOINTS = "checkpoint"  # a sharded run's: a folder per step and latest.json (`distributed`)
KEYS = ("step", "model", "optimizer", "rng", "settings")  # what every checkpoint holds


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


# What a run writes in its folder: the files (each through `atomic_write`) and the model folder (written as
# ``.model.tmp``, then renamed). Only their temporaries are a killed run's orphans; anything else is not ours.
RUN_FILES = (CHECKPOINT, "config.json", "metrics.jsonl", "geffects.json")
RUN_FOLDERS = ("model",)
_MKSTEMP_PART = r"[a-z0-9_]{8}"  # the random middle of a `tempfile.mkstemp` name


def remove_orphans(folder, files=RUN_FILES, folders=RUN_FOLDERS) -> list[Path]:
    """Delete the temporary files (and the temporary model folder) a killed run left in ``folder``: only those of
    the names a run writes (``files``, ``folders``), never another ``.*.tmp``.

    Only safe while holding the folder's lock (`run_lock`): another writer's are in flight otherwise."""
    names = re.compile("|".join([rf"\.{re.escape(name)}\.{_MKSTEMP_PART}\.tmp" for name in files]
                                + [rf"\.{re.escape(name)}\.tmp" for name in folders]))
    orphans = sorted(p for p in Path(folder).glob(".*.tmp") if names.fullmatch(p.name))
    for path in orphans:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    return orphans


def check_own_folder(folder) -> None:
    """ValueError when ``folder`` holds a ``model/`` that no run wrote: a run replaces its ``model/`` at the end
    (and ``--overwrite`` removes it at the start), so a folder holding one must show a run's own files (a
    checkpoint, its log, or a ``config.json`` with an objective)."""
    folder = Path(folder)
    if not any((folder / name).exists() or (folder / name).is_symlink() for name in RUN_FOLDERS):
        return
    if (folder / CHECKPOINT).is_file() or (folder / "metrics.jsonl").is_file() or \
            (folder / SHARDED_CHECKPOINTS / "latest.json").is_file() or _has_objective(folder / "config.json"):
        return
    raise ValueError(f"{folder} holds a model/ that no geffect run wrote there: move it or choose another --out "
                     f"(nothing was removed)")


def _has_objective(path: Path) -> bool:
    try:
        return "objective" in read_json(path)
    except (UnreadableFile, TypeError):
        return False


def save_checkpoint(out_dir, state: dict) -> Path:
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(out_dir) -> dict | None:
    """The last checkpoint in ``out_dir``, or None when there is none; CheckpointError when it is not one.

    Tensors are memory-mapped, not read: looking at a checkpoint's step and settings costs little."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data: not loaded (loading it "
                              f"could run code); delete it or pass --overwrite (resume=False)") from None
    except Exception as err:  # truncated, corrupt, not a torch file: torch raises many kinds
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {_first_line(err)}); delete it or "
                              f"pass --overwrite (resume=False)") from None
    missing = [key for key in KEYS if key not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a geffect checkpoint (no {', '.join(missing)}); delete it or pass "
                              f"--overwrite (resume=False)")
    return state


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [""])[0]
