"""A run folder's files read as untrusted input, and the report's files written only inside the folder.

Names read from files (objectives in ``config.json``, run folders, risks in ``geffects.json``) become parts of
file names, so each is checked against a safe alphabet: one path component, never ``..`` or ``/``. Numbers
the report formats or plots must be numbers. Anything else is refused with one line naming the file, before
anything is written. The report's own files are written atomically (a temporary file renamed over the name):
a planted symbolic link is replaced, never written through, and ``results/`` and ``plots/`` must be real
folders inside the run folder.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from ..atomic_files import atomic_write, atomic_write_text
from .. import structured_files

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~-])")


def check_name(name, what: str, source) -> str:
    """``name`` when it is a safe file-name part (letters, digits, ``_ . + -``, starting with a letter or
    digit, at most 100 characters); ValueError naming ``source`` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{source}: {what} {str(name)[:60]!r} is not a safe name (letters, digits and _ . + -, "
                         f"starting with a letter or digit, at most 100 characters): refused, nothing written")
    return name


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(value, what: str, source, *, optional=False):
    if (optional and value is None) or is_number(value):
        return value
    raise ValueError(f"{source}: {what} must be a number, got {str(value)[:60]!r}")


def read_json(path, default=None):
    """``path``'s JSON (``default`` when there is no such file); ValueError naming it when it is not JSON or not
    a regular file."""
    path = Path(path)
    if not path.exists():
        return default
    return structured_files.read_json(path)


TEXT_METRICS = ("retain_reference",)  # where a summary's reference numbers came from


def _check_metrics(metrics, what, source):
    for key, value in metrics.items():
        if key == "missing":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError(f"{source}: {what}.missing must map metrics to reasons")
        elif key in TEXT_METRICS:
            if not isinstance(value, str):
                raise ValueError(f"{source}: {what}.{key} must be text")
        elif isinstance(value, dict):
            _check_metrics(value, f"{what}.{key}", source)
        else:
            check_number(value, f"{what}.{key}", source, optional=True)


def check_summaries(summaries, source) -> dict:
    """``{run name: {metric: number or None or {name: ...}}}``, nested as deep as a summary goes (``mia_auc``,
    ``muse``); ``missing`` reasons and ``retain_reference`` are text."""
    if not isinstance(summaries, dict) or not all(isinstance(s, dict) for s in summaries.values()):
        raise ValueError(f"{source}: must map each model's name to its metrics")
    for name, summary in summaries.items():
        _check_metrics(summary, name, source)
    return summaries


def check_trajectories(points, source) -> list:
    """Probe points: ``objective`` a safe name, ``seed`` an integer or None, ``step`` an integer, ``probe_*``
    numbers or lists of numbers."""
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{source}: must be a list of probe points")
    for k, point in enumerate(points):
        check_name(point.get("objective"), f"point {k}'s objective", source)
        if not isinstance(point.get("step"), int) or point.get("seed") is not None and not isinstance(point["seed"],
                                                                                                    int):
            raise ValueError(f"{source}: point {k}'s step and seed must be integers")
        for key, value in point.items():
            if key.startswith("probe_"):
                for number in value if isinstance(value, list) else [value]:
                    check_number(number, f"point {k}'s {key}", source)
    return points


def check_timing(timing, source) -> dict:
    if not isinstance(timing, dict):
        raise ValueError(f"{source}: must be a mapping")
    for key in ("seconds", "torch_threads"):
        check_number(timing.get(key), key, source)
    for key in ("cpu_seconds", "load_before", "load_after"):
        check_number(timing.get(key), key, source, optional=True)
    return timing


def markdown(text) -> str:
    """``text`` shown literally in Markdown (a table cell, a heading): its special characters escaped, one line."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def folder_inside(run_dir: Path, name: str) -> Path:
    """``run_dir/name`` as a real folder (made when absent); ValueError when it is a link or not a folder."""
    folder = run_dir / name
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} is not a folder inside {run_dir} (a link or a file): refused, nothing written")
    folder.mkdir(exist_ok=True)
    return folder


def write_csv(path, rows, columns):
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=1))


def save_figure(fig, path, **kwargs):
    """``fig`` as a PNG at ``path``, written atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", **kwargs))
