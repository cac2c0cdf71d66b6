"""Records (one dict per example) from the files data sets are published as.

- a JSON file: a list of records, an object with a ``"data"`` list, or JSON Lines (one record a line), told
  apart by the content, whatever the suffix (TOFU's ``real_authors_perturbed.json`` is JSON Lines);
- a parquet file, or an Arrow file (``.arrow``: IPC stream or file format);
- a folder written by Hugging Face ``datasets``' ``save_to_disk``: a ``Dataset`` (``state.json`` and its Arrow
  files) or a ``DatasetDict`` (``dataset_dict.json`` and one such folder per split);
- a split in a Hub-style folder, named as ``FOLDER/SPLIT``: the files ``SPLIT.json``, ``SPLIT.jsonl``,
  ``SPLIT.parquet`` or the shards ``SPLIT-00000-of-00002.parquet``, ... in FOLDER (or FOLDER/data): TOFU's
  ``forget10/train-00000-of-00001.parquet``, MUSE's ``knowmem/forget_qa-00000-of-00001.parquet``;
- a Hub-style folder that holds one split (or a ``train`` split): that split.

Parquet and Arrow need ``pyarrow`` (``pip install pyarrow``); JSON needs nothing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..structured_files import (UnreadableFile, check_depth, parse_json, parse_jsonl_line, read_bytes, read_json,
                                read_text)
from .arrow_schema import (MalformedSchema, UnsafeSchema, arrow_metadata, check_no_python_extension, is_ipc_file,
                           parquet_metadata)
from .errors import DataError

DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")
_SHARD = re.compile(r"(.+?)(?:-\d{5}-of-\d{5})?$")  # "train-00000-of-00001" -> "train"


def _pyarrow(path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodules used below)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading parquet and Arrow files needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _json_records(path: Path) -> list:
    text = _checked(read_text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        try:
            json.loads(lines[0][1]) if lines else None
        except json.JSONDecodeError:  # not even its first line is JSON: report it as one JSON document
            raise DataError(f"{path}: not valid JSON ({whole.msg} at line {whole.lineno})") from None
        except RecursionError:
            pass  # deeply nested: parse_jsonl_line below says so
        return _json_lines(path, lines)
    except RecursionError:
        _checked(parse_json, text, path)  # raises: nested too deep
    check_depth_or_refuse(data, path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records (or an object with a 'data' list)")
    return data


def _json_lines(path, lines) -> list:
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        except RecursionError:
            _checked(parse_jsonl_line, line, path, number)  # raises: nested too deep
        check_depth_or_refuse(records[-1], f"{path} line {number}")
    return records


def _checked(read, *args):
    """``read(*args)`` with its UnreadableFile (not a regular file, not UTF-8, nested too deep) as a DataError."""
    try:
        return read(*args)
    except UnreadableFile as err:
        raise DataError(str(err)) from None


def check_depth_or_refuse(value, source):
    _checked(check_depth, value, source)


def _checked_bytes(path: Path, schema_metadata, what: str) -> bytes:
    """The bytes of ``path`` once its schema's metadata, read by ``schema_metadata`` (`arrow_schema`) without
    pyarrow, declares no Python extension type; pyarrow then reads these same bytes, so the file cannot change
    in between."""
    data = _checked(read_bytes, path)
    try:
        check_no_python_extension(schema_metadata(data))
    except MalformedSchema as err:
        raise DataError(f"{path}: not a readable {what} file ({err})") from None
    except UnsafeSchema as err:
        raise DataError(f"{path}: {err}") from None
    return data


def _validated_records(pa, table, path: Path, what: str) -> list:
    """The rows of ``table`` once every buffer is checked (offsets past their data crashed the process)."""
    try:
        table.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException) as err:
        raise DataError(f"{path}: damaged {what} data ({_first_line(err)})") from None
    return table.to_pylist()


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _arrow_records(path: Path) -> list:
    pa = _pyarrow(path)
    data = _checked_bytes(path, arrow_metadata, "Arrow")
    try:
        source = pa.BufferReader(data)
        reader = pa.ipc.open_file(source) if is_ipc_file(data) else pa.ipc.open_stream(source)
        table = reader.read_all()  # the stream is what save_to_disk writes
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Arrow file ({_first_line(err)})") from None
    return _validated_records(pa, table, path, "Arrow")


def _parquet_records(path: Path) -> list:
    pa = _pyarrow(path)
    data = _checked_bytes(path, parquet_metadata, "parquet")
    try:
        table = pa.parquet.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(err)})") from None
    return _validated_records(pa, table, path, "parquet")


def _file_records(path: Path) -> list:
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix == ".arrow":
        return _arrow_records(path)
    return _json_records(path)


def _saved_dataset(folder: Path) -> list:
    """A ``Dataset.save_to_disk`` folder: its Arrow files in the order ``state.json`` lists them."""
    state = _checked(read_json, folder / "state.json")
    try:
        files = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{folder}: state.json does not list the data files ({type(err).__name__}: {err})") from None
    return [record for name in files for record in _arrow_records(_inside(folder, name, "state.json"))]


def _inside(folder: Path, name, listed_in: str) -> Path:
    """``folder / name`` for a name that ``listed_in`` gives: text naming something inside ``folder`` (a crafted
    file must not make the reader open files elsewhere)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or \
            not (folder / name).resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{folder / listed_in}: {str(name)[:80]!r} is not a name inside {folder}: refused")
    return folder / name


def _split_files(folder: Path) -> dict[str, list[Path]]:
    """``{split: [files]}`` of the data files directly in ``folder`` (shards of one split together, in order)."""
    splits = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in DATA_SUFFIXES:
            splits.setdefault(_SHARD.fullmatch(path.stem).group(1), []).append(path)
    return splits


def _one_split(folder: Path, splits, what) -> str:
    if len(splits) == 1:
        return next(iter(splits))
    if "train" in splits:
        return "train"
    names = ", ".join(sorted(splits))
    raise DataError(f"{folder} holds the {what} {names}: name one as {folder}/NAME")


def _folder_records(folder: Path) -> list:
    if (folder / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: one saved Dataset per split
        listed = _checked(read_json, folder / "dataset_dict.json")
        splits = listed.get("splits") if isinstance(listed, dict) else None
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise DataError(f"{folder / 'dataset_dict.json'}: 'splits' must be a list of split names, got "
                            f"{str(splits)[:60]!r}")
        split = _one_split(folder, dict.fromkeys(splits), "splits")
        return _saved_dataset(_inside(folder, split, "dataset_dict.json"))
    if (folder / "state.json").exists():
        return _saved_dataset(folder)
    splits = _split_files(folder)
    if splits:
        return [r for path in splits[_one_split(folder, splits, "splits")] for r in _file_records(path)]
    if (folder / "data").is_dir():
        return _folder_records(folder / "data")
    raise DataError(f"{folder}: a folder without data files (json, jsonl, parquet, arrow) or a saved dataset")


def _named_split(path: Path) -> list[Path] | None:
    """The files of split ``path.name`` in ``path.parent`` (or its ``data/``), or None."""
    for folder in (path.parent, path.parent / "data"):
        if folder.is_dir():
            files = _split_files(folder).get(path.name)
            if files:
                return files
    return None


def read_records(path) -> list:
    """The records stored at ``path`` (see the module docstring for the layouts); DataError naming the
    file and the problem otherwise."""
    path = Path(path)
    if path.is_file():
        return _file_records(path)
    if path.is_dir():
        return _folder_records(path)
    if path.exists():  # a FIFO would block, a device (/dev/zero) never ends
        _checked(read_bytes, path, 0)  # raises: not a regular file
    files = _named_split(path)
    if files is None:
        raise DataError(f"{path}: no such file, folder or split")
    return [r for file in files for r in _file_records(file)]


__all__ = ["DATA_SUFFIXES", "read_records"]
