"""The benchmark figures of benchmarks/README.md and of the README's figures section are the committed results'
numbers, and every result says where it comes from (commit, machine, instruction set, load; JSON: library versions)."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "readme_figures", Path(__file__).resolve().parent.parent / "benchmarks" / "readme_figures.py")
readme_figures = sys.modules["readme_figures"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_figures)

FIGURES = [(page, fig) for page in readme_figures.PAGES for fig in readme_figures.figures(page.read_text())]
TEXT = readme_figures.README.read_text()
CPU_RESULTS = ["cpu_kernels.csv", "cpu_token_loss.csv", "geffect_cpu.csv"]  # CSVs of the earlier CPU scripts


@pytest.mark.parametrize("page", readme_figures.PAGES, ids=lambda p: p.name)
def test_every_measured_figure_on_the_page_is_tagged(page):
    text = readme_figures.tagged_text(page)
    assert len(readme_figures.figures(text)) >= 5
    assert readme_figures.untagged(text) == []


def test_the_figures_shown_come_from_pytest_benchmark_results():
    assert {fig.file for _, fig in FIGURES if "vs_" in fig.column} <= {f.name for f in readme_figures.RESULTS.glob(
        "*.json")}


@pytest.mark.parametrize("page,fig", FIGURES,
                         ids=lambda x: x.name if isinstance(x, Path) else f"{x.file}:{x.column}:"
                                                                          f"{'/'.join(x.filters.values())}")
def test_figure_equals_its_source_in_value_rounding_and_unit(page, fig):
    if not fig.is_text:
        assert fig.unit == readme_figures.expected_unit(fig.column), f"unit of {fig.column}"
    shown = fig.shown.lstrip("+") if not fig.is_text else fig.shown
    assert shown == readme_figures.source_value(fig), "python benchmarks/readme_figures.py rewrites it from the result"


def test_figure_checker_rejects_a_changed_number_a_wrong_unit_and_an_untagged_figure():
    fig = next(f for f in readme_figures.figures(TEXT) if not f.is_text and f.unit == "×")
    changed = TEXT[:fig.start] + "9" + TEXT[fig.start:]  # 0.92× -> 90.92×
    wrong = next(f for f in readme_figures.figures(changed) if f.start == fig.start)
    assert wrong.shown != readme_figures.source_value(wrong)
    retagged = TEXT[:fig.end] + " ms" + TEXT[fig.end + len(fig.unit):]
    assert next(f for f in readme_figures.figures(retagged) if f.start == fig.start).unit == "ms"
    assert readme_figures.untagged(TEXT + "\n2.5× faster\n") == ["2.5×"]


def test_json_rows_flatten_a_result_and_filters_take_quoted_values():
    data = {"machine_info": {"isa": "avx2", "load_average": [1.5, 2.0, 2.5]}, "commit_info": {"id": "abc"},
            "benchmarks": [{"name": "t[a b]", "group": "g", "param": "a b", "stats": {"median": 0.25, "data": [1]},
                            "extra_info": {"provider": "naive eager", "vs_floor": 1.5}}]}
    row, = readme_figures.json_rows(data)
    assert row["extra_info.vs_floor"] == "1.5" and row["stats.median_ms"] == "250.0" and "stats.data" not in row
    assert row["machine_info.load_average"] == "1.5 2.0 2.5" and row["commit_info.id"] == "abc"
    fig, = readme_figures.figures('1.50×<!-- fig x.json extra_info.provider="naive eager" extra_info.vs_floor -->')
    assert fig.filters == {"extra_info.provider": "naive eager"} and fig.column == "extra_info.vs_floor"
    assert readme_figures.expected_unit("stats.median_ms") == "ms"


@pytest.mark.parametrize("path", sorted(readme_figures.RESULTS.glob("*.csv")), ids=lambda p: p.name)
def test_every_csv_row_names_commit_machine_and_instruction_set(path):
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


@pytest.mark.parametrize("path", sorted(readme_figures.RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_json_result_names_commit_machine_versions_and_load(path):
    data = json.loads(path.read_text())
    machine, commit = data["machine_info"], data["commit_info"]
    assert commit.get("id") and not commit.get("dirty"), f"{path.name}: measured code of no commit"
    assert machine["isa"] and machine["cpu_name"] and data["run_info"]["load_average"]
    assert data["run_info"]["load_average_at_start"] and commit["id"].startswith(data["run_info"]["geffect_commit"])
    assert all(machine["libraries"][name] for name in ("torch", "transformers", "pytest-benchmark"))
    assert data["benchmarks"] and all(b["extra_info"].get("vs_floor") for b in data["benchmarks"]
                                      if b["group"] and not b["group"].startswith("train peak memory"))
