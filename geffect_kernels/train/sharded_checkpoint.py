"""A sharded run's checkpoint files, read as tensors and plain data only: nothing in a run folder runs code.

``checkpoint/step-N/`` holds ``torch.distributed.checkpoint``'s shards (``*.distcp``) and index (``.metadata``),
``loop.json`` (the step, settings and G-effect history: JSON) and one ``rng-<rank>.pt`` per rank (RNG states:
tensors); ``checkpoint/latest.json`` names the complete step. ``torch.distributed.checkpoint`` itself would
unpickle ``.metadata`` and every non-tensor entry of the shards with plain ``pickle``: here ``.metadata`` goes
through an unpickler that builds only the index's own classes (`METADATA_CLASSES`, torch dtypes), whose file
names must stay inside the step folder, and non-tensor entries load ``weights_only``. Anything else stops the run
with a `CheckpointError` naming the file.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from ..atomic_files import atomic_write, atomic_write_json
from .checkpoint import CheckpointError, check_loop_state, check_rng_state
from ..structured_files import UnreadableFile, read_json

LATEST = "latest.json"
LOOP_STATE = "loop.json"
LOOP_KEYS = ("step", "settings")  # what `loop_state` always holds
_OVERWRITE = "delete the run's checkpoint/ folder or pass --overwrite (resume=False)"

# (module, name) of everything a `.metadata` file of torch.distributed.checkpoint's FileSystemWriter pickles
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
      ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
      ("collections", "OrderedDict")}


def rng_file(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / f"rng-{rank}.pt"


def write_rng(step_dir: Path, rank: int, device) -> None:
    state = {"rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else None}
    atomic_write(rng_file(step_dir, rank), lambda f: torch.save(state, f))


def read_rng(step_dir: Path, rank: int) -> dict:
    path = rng_file(step_dir, rank)
    state = _load_weights_only(path)
    if not isinstance(state, dict) or not isinstance(state.get("rng"), torch.Tensor):
        raise CheckpointError(f"{path} holds no RNG state; {_OVERWRITE}")
    check_rng_state(path, "rng", state["rng"])
    return state


def write_loop_state(step_dir: Path, state: dict) -> None:
    atomic_write_json(Path(step_dir) / LOOP_STATE, state)


def read_loop_state(step_dir: Path) -> dict:
    path = Path(step_dir) / LOOP_STATE
    state = _read_json(path)
    if not isinstance(state, dict) or any(key not in state for key in LOOP_KEYS):
        raise CheckpointError(f"{path} is not a run's loop state (no {', '.join(LOOP_KEYS)}); {_OVERWRITE}")
    check_loop_state(path, state)
    return state


def read_latest(root: Path) -> dict | None:
    """``{"step": N, "world_size": W}`` of ``root/latest.json`` (both positive integers: the step becomes a folder
    name), None when there is none; CheckpointError otherwise."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    info = _read_json(path)
    if not isinstance(info, dict) or not all(_positive_int(info.get(key)) for key in ("step", "world_size")):
        raise CheckpointError(f"{path} must name a step and a world size, both positive integers; {_OVERWRITE}")
    return info


def load_shards(state: dict, step_dir: Path) -> None:
    """``torch.distributed.checkpoint.load`` of ``step_dir`` into ``state`` (in place, on every rank), with the
    index unpickled by `METADATA_CLASSES` only and non-tensor entries ``weights_only``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _SafeReader(str(step_dir)), _SafePlanner()
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # dcp logs each metadata file it could not read, with a traceback
    try:
        reader.read_metadata()  # here first: its errors as they are, before dcp wraps them
        dcp.load(state, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        if isinstance(err, CheckpointException):  # one rank's failure, raised on every rank
            err = next(iter(err.failures.values()), err)
            err = err[0] if isinstance(err, tuple) else err  # (exception, its stack)
        raise _as_checkpoint_error(planner.refused or reader.refused or err, step_dir) from None
    finally:
        root_logger.setLevel(level)


def _as_checkpoint_error(err, step_dir) -> CheckpointError:
    if isinstance(err, CheckpointError):
        return err
    if isinstance(err, pickle.UnpicklingError):
        return CheckpointError(f"{step_dir} holds objects other than tensors and plain data ({_first_line(err)}): not "
                               f"loaded (loading it could run code); {_OVERWRITE}")
    return CheckpointError(f"{step_dir} cannot be read ({type(err).__name__}: {_first_line(err)}); {_OVERWRITE}")


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        refused = None  # why the index could not be read: raised again instead of falling back to another

        def read_metadata(self, *args, **kwargs):
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            if self.refused is not None and not path.is_file():
                raise self.refused  # dcp falls back to a rank's own index, which this writer never makes
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as err:
                self.refused = err
                raise
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path} is not a checkpoint index; {_OVERWRITE}")
            for info in (metadata.storage_data or {}).values():
                name = str(getattr(info, "relative_path", ""))
                if not name or "/" in name or "\\" in name or name.startswith("."):
                    raise CheckpointError(f"{path} names a shard outside its folder ({name!r}): refused")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        refused = None  # the entry that was not plain data, raised as is instead of dcp's wrapping

        def load_bytes(self, read_item, value):
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                self.refused = pickle.UnpicklingError(f"entry {read_item.dest_index.fqn}: {_first_line(err)}")
                raise self.refused from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner


def _SafeReader(path):  # noqa: N802  (a class built on first use: torch.distributed.checkpoint imports slowly)
    return _safe_reader_class()(path)


def _SafePlanner():  # noqa: N802
    return _safe_planner_class()()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in METADATA_CLASSES or module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def _load_weights_only(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data: not loaded (loading it "
                              f"could run code); {_OVERWRITE}") from None
    except Exception as err:  # truncated, corrupt, missing
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {_first_line(err)}); "
                              f"{_OVERWRITE}") from None


def _read_json(path: Path):
    try:
        return read_json(path)
    except UnreadableFile as err:
        raise CheckpointError(f"{path} cannot be read ({err.reason}); {_OVERWRITE}") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
