"""The run folder's checkpoint, written atomically (`atomic_files`, whose writers are re-exported here).

A file written here is either the old complete file or the new complete file, never half of one, whenever
the process is killed; what a kill can leave is a temporary ``.NAME.*.tmp`` beside it, which the next run
in the folder removes (`remove_orphans`). A checkpoint is loaded as tensors and plain data only
(``weights_only``): a crafted file in a run folder is refused, never executed.
"""
from __future__ import annotations

import contextlib
import math
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..atomic_files import atomic_write as atomic_write
from ..atomic_files import atomic_write_json as atomic_write_json
from ..atomic_files import atomic_write_text as atomic_write_text
from ..structured_files import UnreadableFile, read_json
from .run_paths import refuse_links

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
    """ValueError when a path the run writes or deletes in ``folder`` is a symbolic link (`run_paths`), or when
    ``folder`` holds a ``model/`` that no run wrote: a run replaces its ``model/`` at the end (and ``--overwrite``
    removes it at the start), so a folder holding one must show a run's own files (a checkpoint, its log, or a
    ``config.json`` with an objective)."""
    folder = Path(folder)
    refuse_links(folder, *RUN_FILES, *RUN_FOLDERS, *(f".{name}.tmp" for name in RUN_FOLDERS), SHARDED_CHECKPOINTS,
                 *(p.relative_to(folder) for p in _entries(folder / SHARDED_CHECKPOINTS)))
    if not any((folder / name).exists() or (folder / name).is_symlink() for name in RUN_FOLDERS):
        return
    if (folder / CHECKPOINT).is_file() or (folder / "metrics.jsonl").is_file() or \
            (folder / SHARDED_CHECKPOINTS / "latest.json").is_file() or _has_objective(folder / "config.json"):
        return
    raise ValueError(f"{folder} holds a model/ that no geffect run wrote there: move it or choose another --out "
                     f"(nothing was removed)")


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds (nothing when it is no real folder)."""
    return list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


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
    check_loop_state(path, state)
    model = state["model"]
    if not isinstance(model, dict) or not model or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        _refuse(path, "model", "must map parameter names to tensors", model)
    if not isinstance(state["optimizer"], dict):
        _refuse(path, "optimizer", "must be an optimizer's state", state["optimizer"])
    check_rng_state(path, "rng", state["rng"])
    cuda = state.get("cuda_rng")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
        _refuse(path, "cuda_rng", "must be a list of RNG states", cuda)
    return state


def check_loop_state(path, state: dict) -> None:
    """CheckpointError naming ``path`` and the field when what every checkpoint holds besides its tensors (the
    step, the settings, the settings changed on the way, the G-effect history, PDU's dual variable) is not of its
    type."""
    from ..geffect import GEffectHistory

    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        _refuse(path, "step", "must be an integer >= 0", step)
    if not isinstance(state.get("settings"), dict) or not isinstance(state["settings"].get("steps", 0), int):
        _refuse(path, "settings", "must map each setting to its value", state.get("settings"))
    changes = state.get("setting_changes", [])
    if not isinstance(changes, list) or not all(
            isinstance(c, dict) and isinstance(c.get("step"), int) and isinstance(c.get("before"), dict)
            for c in changes):
        _refuse(path, "setting_changes", "must be a list of {step, before}", changes)
    dual = state.get("dual")
    if dual is not None and (not isinstance(dual, (int, float)) or isinstance(dual, bool) or not math.isfinite(dual)):
        _refuse(path, "dual", "must be a finite number (PDU's dual variable) or null", dual)
    if state.get("geffects") is not None:
        try:
            GEffectHistory.from_dict(state["geffects"])
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            _refuse(path, "geffects", f"is not a G-effect history ({type(err).__name__}: {_first_line(err)})",
                    state["geffects"])


def check_rng_state(path, field: str, value) -> None:
    """CheckpointError unless ``value`` is a state of torch's CPU generator (bytes of its size)."""
    expected = torch.get_rng_state()
    if not isinstance(value, torch.Tensor) or value.dtype != expected.dtype or value.shape != expected.shape:
        _refuse(path, field, f"must be the CPU generator's state ({expected.numel()} bytes)", value)


@contextlib.contextmanager
def fitted(path, field: str):
    """Loading field ``field`` of checkpoint ``path`` into this run: what fails (keys or shapes of another model, an
    optimizer of other parameters) is a CheckpointError naming both."""
    try:
        yield
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: {field} does not fit this run ({type(err).__name__}: {_first_line(err)}); "
                              f"delete it or pass --overwrite (resume=False)") from None


def check_model_fits(model, saved: dict) -> None:
    """ValueError naming the first parameter that ``saved`` (a state dict) lacks or holds in another shape."""
    for name, tensor in model.state_dict().items():
        if name not in saved:
            raise ValueError(f"it has no {name}")
        if saved[name].shape != tensor.shape:
            raise ValueError(f"its {name} has shape {list(saved[name].shape)}, this model's {list(tensor.shape)}")


def check_optimizer_fits(optimizer) -> None:
    """ValueError when a loaded optimizer state holds a tensor of another shape than its parameter's."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"its {name} has shape {list(value.shape)} for a parameter of shape "
                                     f"{list(param.shape)}")


def _refuse(path, field: str, what: str, value):
    shown = f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else f"{value!r:.40}"
    raise CheckpointError(f"{path}: {field} {what}, got {shown}; delete it or pass --overwrite (resume=False)")


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [""])[0]
