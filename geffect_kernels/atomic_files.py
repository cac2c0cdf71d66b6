"""Files written whole or not at all: a reader, or a process killed mid-write, sees the old complete file or the
new complete one. What a kill can leave is a temporary ``.NAME.*.tmp`` beside it (`train.checkpoint.remove_orphans`
cleans a run folder of them); a link planted at the path is replaced, never written through."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failed = _os_error(err)
        if failed is None or isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        # a full disk (or another failed write) inside torch.save surfaces as a RuntimeError about its zip
        # stream, the OSError only as its context: one OSError that names the file and what is left
        raise OSError(failed.errno, f"cannot write {path}: {failed.strerror or failed}; "
                                    f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}"
                      ) from None


def _os_error(err: BaseException) -> OSError | None:
    """The first OSError of ``err``'s chain (itself, its cause or context), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))
