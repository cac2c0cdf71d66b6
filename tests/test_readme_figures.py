"""The figures of benchmarks/README.md are the committed CSVs' numbers, and every CSV row says where it comes from."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "readme_figures", Path(__file__).resolve().parent.parent / "benchmarks" / "readme_figures.py")
readme_figures = sys.modules["readme_figures"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_figures)

TEXT = readme_figures.README.read_text()
FIGURES = readme_figures.figures(TEXT)
CPU_RESULTS = ["cpu_kernels.csv", "cpu_token_loss.csv", "geffect_cpu.csv"]  # written by the CPU suites


def test_every_measured_figure_on_the_benchmarks_page_is_tagged():
    assert len(FIGURES) >= 10
    assert readme_figures.untagged(TEXT) == []


@pytest.mark.parametrize("fig", FIGURES, ids=lambda f: f"{f.file}:{f.column}:{'/'.join(f.filters.values())}")
def test_figure_equals_its_csv_cell_in_value_rounding_and_unit(fig):
    if not fig.is_text:
        assert fig.unit == readme_figures.expected_unit(fig.column), f"unit of {fig.column}"
    shown = fig.shown.lstrip("+") if not fig.is_text else fig.shown
    assert shown == readme_figures.source_value(fig), "python benchmarks/readme_figures.py rewrites it from the CSV"


def test_figure_checker_rejects_a_changed_number_a_wrong_unit_and_an_untagged_figure():
    fig = next(f for f in FIGURES if not f.is_text and f.unit == "×")
    changed = TEXT[:fig.start] + "9" + TEXT[fig.start:]  # 0.92× -> 90.92×
    wrong = next(f for f in readme_figures.figures(changed) if f.start == fig.start)
    assert wrong.shown != readme_figures.source_value(wrong)
    retagged = TEXT[:fig.end] + " ms" + TEXT[fig.end + len(fig.unit):]
    assert next(f for f in readme_figures.figures(retagged) if f.start == fig.start).unit == "ms"
    assert readme_figures.untagged(TEXT + "\n2.5× faster\n") == ["2.5×"]


@pytest.mark.parametrize("path", sorted(readme_figures.RESULTS.glob("*.csv")), ids=lambda p: p.name)
def test_every_result_row_names_commit_machine_and_instruction_set(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path.name} is empty"
    for i, row in enumerate(rows):
        assert row.get("commit") not in (None, "", "unknown"), f"{path.name} row {i}: no commit"
        machine = row.get("machine") or row.get("gpu")
        assert machine, f"{path.name} row {i}: no machine"
        if path.name in CPU_RESULTS:
            assert row.get("isa") and row["isa"] in machine, f"{path.name} row {i}: no instruction set"
            assert row.get("load_avg"), f"{path.name} row {i}: no load average"
