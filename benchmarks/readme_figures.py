"""The benchmark figures of benchmarks/README.md, each tied to the CSV cell it shows.

Every measured figure in benchmarks/README.md is followed by a tag naming its source:

    0.92×<!-- fig cpu_token_loss.csv provider=chunked-fused time_vs_naive -->

a file under benchmarks/results/, ``column=value`` filters that select one row, and the column shown. The
statistic is the column's (``ms_min``, ``speedup_median``, ...); the unit follows from its name (``*_mib``: MiB,
``ms_*``: ms, ``speedup_*``, ``vs_*`` and ``*_vs_*``: ×) and must stand next to the number; the page shows the value
rounded to the decimals it prints. A `code span`<!-- fig FILE[,FILE...] filters column --> instead shows a text
column, which every selected row (of every file named) must share, e.g. the machine. tests/test_readme_figures.py
checks all of this.

    python benchmarks/readme_figures.py      # rewrite the tagged figures from the current CSVs
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"  # the whole page is the tagged section
RESULTS = ROOT / "benchmarks" / "results"

UNITS = r"×|ms|MiB|GiB|s"
TAG = re.compile(r"(?:`(?P<text>[^`]*)`|(?P<number>[-+]?\d+(?:\.\d+)?)(?P<space> ?)(?P<unit>" + UNITS + r")?)"
                 r"<!-- fig (?P<spec>[^>]*?) -->")
# A measured figure: a number with a unit. On the page, each must carry a tag.
FIGURE = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?: ?)(?:" + UNITS + r")(?![\w])(?!<!-- fig)")


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
        file, *filters, column = m["spec"].split()
        is_text = m["text"] is not None
        group = "text" if is_text else "number"
        found.append(Figure(m.start(group), m.end(group), m[group], m["unit"], is_text, file,
                            dict(f.split("=", 1) for f in filters), column))
    return found


def untagged(text: str) -> list[str]:
    """Numbers with a unit on the page that carry no tag."""
    body = TAG.sub("", text)
    return [m.group(0) for m in FIGURE.finditer(body)]


def expected_unit(column: str) -> str | None:
    if column.endswith("_mib"):
        return "MiB"
    if column.startswith("ms_") or column.endswith("_ms"):
        return "ms"
    if column.startswith(("speedup", "vs_")) or "_vs_" in column:
        return "×"
    return None


def rows(file: str) -> list[dict]:
    with open(RESULTS / file, newline="") as f:
        return list(csv.DictReader(f))


def source_value(fig: Figure) -> str:
    """The CSV value the figure shows, formatted as the page prints it; AssertionError when it has no source."""
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
    """Rewrite every tagged figure from its CSV cell; returns how many changed."""
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
    print(f"{update()} figures updated in {README}")
