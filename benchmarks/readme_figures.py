"""The benchmark figures of benchmarks/README.md and of the README's figures section, each tied to the result it
shows.

Every measured figure is followed by a tag naming its source:

    1.08×<!-- fig cpu_suite.json extra_info.provider=cpp_cpu extra_info.objective=ga extra_info.vs_floor -->
    0.92×<!-- fig cpu_token_loss.csv provider=chunked-fused time_vs_naive -->

a file under benchmarks/results/, ``key=value`` filters that select one row (a value with spaces in double quotes),
and the key shown. A CSV row is its columns; a pytest-benchmark JSON result has one row per benchmark: its ``name``,
``group`` and ``param``, ``extra_info.*``, ``stats.*`` (seconds) with ``stats.*_ms`` beside them, and the run's
``machine_info.*``, ``commit_info.*`` and ``run_info.*`` (nested keys joined by dots, lists by spaces). The unit
follows from the key's last part (``*_mib``: MiB, ``*_ms``: ms, ``speedup_*``, ``vs_*`` and ``*_vs_*``: ×) and
must stand next to the number; the page shows the value rounded to the decimals it prints. A
`code span`<!-- fig FILE[,FILE...] filters key --> instead shows a text value, which every selected row (of every
file named) must share, e.g. the machine. tests/test_readme_figures.py checks all of this.

    python benchmarks/readme_figures.py      # rewrite the tagged figures from the current results
"""
from __future__ import annotations

import csv
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"  # the whole page is the tagged section
TOP_README = ROOT / "README.md"  # its section between <!-- figures --> and <!-- /figures -->
PAGES = (README, TOP_README)
RESULTS = ROOT / "benchmarks" / "results"

UNITS = r"×|ms|MiB|GiB|s"
TAG = re.compile(r"(?:`(?P<text>[^`]*)`|(?P<number>[-+]?\d+(?:\.\d+)?)(?P<space> ?)(?P<unit>" + UNITS + r")?)"
                 r"<!-- fig (?P<spec>[^>]*?) -->")
# A measured figure: a number with a unit. On the page, each must carry a tag.
FIGURE = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?: ?)(?:" + UNITS + r")(?![\w])(?!<!-- fig)")
SECTION = re.compile(r"<!-- figures -->(.*?)<!-- /figures -->", re.S)


@dataclass
class Figure:
    start: int  # offsets of the shown value (number or code span) in the page
    end: int
    shown: str  # as printed (number without unit, or the code span's text)
    unit: str | None
    is_text: bool
    file: str
    filters: dict
    column: str


def figures(text: str) -> list[Figure]:
    found = []
    for m in TAG.finditer(text):
        file, *filters, column = shlex.split(m["spec"])
        is_text = m["text"] is not None
        group = "text" if is_text else "number"
        found.append(Figure(m.start(group), m.end(group), m[group], m["unit"], is_text, file,
                            dict(f.split("=", 1) for f in filters), column))
    return found


def tagged_text(path: Path) -> str:
    """The part of a page whose figures must all be tagged: the whole of benchmarks/README.md, the figures section
    of the README."""
    text = path.read_text()
    return text if path == README else "".join(SECTION.findall(text))


def untagged(text: str) -> list[str]:
    """Numbers with a unit on the page that carry no tag."""
    body = TAG.sub("", text)
    return [m.group(0) for m in FIGURE.finditer(body)]


def expected_unit(column: str) -> str | None:
    column = column.rsplit(".", 1)[-1]
    if column.endswith("_mib"):
        return "MiB"
    if column.startswith("ms_") or column.endswith("_ms"):
        return "ms"
    if column.startswith(("speedup", "vs_")) or "_vs_" in column:
        return "×"
    return None


def _flat(value, prefix, out):
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(value, list):
        out[prefix] = " ".join(str(v) for v in value)
    else:
        out[prefix] = "" if value is None else str(value)
    return out


def json_rows(data: dict) -> list[dict]:
    """One flat row per benchmark of a pytest-benchmark JSON result, with the run's machine and commit."""
    run = _flat({k: data.get(k, {}) for k in ("machine_info", "commit_info", "run_info")}, "", {})
    out = []
    for b in data["benchmarks"]:
        stats = {k: v for k, v in b["stats"].items() if k != "data"}
        stats |= {f"{k}_ms": v * 1e3 for k, v in b["stats"].items() if k in ("min", "max", "mean", "median", "iqr")}
        out.append(run | _flat({"name": b["name"], "group": b["group"], "param": b["param"],
                                "extra_info": b["extra_info"], "stats": stats}, "", {}))
    return out


def rows(file: str) -> list[dict]:
    if file.endswith(".json"):
        return json_rows(json.loads((RESULTS / file).read_text()))
    with open(RESULTS / file, newline="") as f:
        return list(csv.DictReader(f))


def source_value(fig: Figure) -> str:
    """The result's value the figure shows, formatted as the page prints it; AssertionError when it has no source."""
    selected = [r for file in fig.file.split(",") for r in rows(file)
                if all(r.get(k) == v for k, v in fig.filters.items())]
    where = f"{fig.file} {fig.filters} {fig.column}"
    assert selected, f"no row of {where}"
    assert all(fig.column in r for r in selected), f"no column {where}"
    if fig.is_text:
        values = {r[fig.column] for r in selected}
        assert len(values) == 1, f"rows of {where} differ: {sorted(values)}"
        return values.pop()
    assert len(selected) == 1, f"{len(selected)} rows match {where}; a figure needs one"
    decimals = len(fig.shown.split(".")[1]) if "." in fig.shown else 0
    return f"{float(selected[0][fig.column]):.{decimals}f}"


def update(path: Path = README) -> int:
    """Rewrite every tagged figure of ``path`` from its source; returns how many changed."""
    text = path.read_text()
    changed = 0
    for fig in reversed(figures(text)):  # from the end: earlier offsets stay valid
        value = source_value(fig)
        shown = fig.shown.lstrip("+") if not fig.is_text else fig.shown
        if value != shown:
            sign = "+" if fig.shown.startswith("+") else ""
            text = text[:fig.start] + sign + value + text[fig.end:]
            changed += 1
    path.write_text(text)
    return changed


if __name__ == "__main__":
    for page in PAGES:
        print(f"{update(page)} figures updated in {page.relative_to(ROOT)}")
