"""The benchmark suites' session: the ``gpu`` marker (skipped without CUDA, unless a smoke run puts those tests on
the CPU), each group's ratios to its yardsticks written into every benchmark's ``extra_info`` before the results are
saved, the library versions in ``machine_info`` (what a comparison with a saved run checks: stable per machine), the
load average at the start and the end and this checkout's commit in the JSON's ``run_info``, and the ratio table
after the timings."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the suites import their shared setup modules

import pytest  # noqa: E402

import bench  # noqa: E402
import ratios  # noqa: E402

if bench.GPU_SMOKE:  # before triton is imported: its kernels are then defined for the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

_LOAD_AT_START = []


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: a GPU benchmark (skipped without CUDA; GEFFECT_BENCH_GPU_SMOKE=1 runs it "
                                       "on the CPU with tiny shapes)")
    _LOAD_AT_START[:] = [ratios.load_average()]


def pytest_collection_modifyitems(config, items):
    import torch
    if bench.GPU_SMOKE or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (GEFFECT_BENCH_GPU_SMOKE=1 runs the GPU cases on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # before pytest-benchmark's own sessionfinish saves the JSON and loads the comparison: the ratios travel with it
    benchmarks = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", [])
    ratios.annotate([(b.group, b.name, b.stats, b.extra_info) for b in benchmarks if b and not b.has_error])
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(ratios.environment())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["run_info"] = ratios.run_info(_LOAD_AT_START[0] if _LOAD_AT_START else None)


def pytest_benchmark_update_commit_info(config, commit_info):
    if not commit_info.get("id") and os.environ.get("GEFFECT_COMMIT"):  # a tree copied without .git (lent GPU)
        commit_info["id"] = os.environ["GEFFECT_COMMIT"]


def pytest_terminal_summary(terminalreporter):
    benchmarks = getattr(getattr(terminalreporter.config, "_benchmarksession", None), "benchmarks", [])
    rows = [ratios.row(b.group, b.name, b.stats, b.extra_info) for b in benchmarks if b and not b.has_error]
    if rows:
        terminalreporter.write_line("")
        terminalreporter.write_line(ratios.table(rows))
