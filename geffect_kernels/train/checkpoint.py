"""Atomic files: a checkpoint (or log) is either the old complete file or the new complete file, never
half of one, whenever the process is killed."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def save_checkpoint(out_dir, state: dict) -> Path:
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(out_dir) -> dict | None:
    """The last checkpoint in ``out_dir``, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
