"""Each benchmark group's ratios to its yardsticks, the environment a result was measured in, and the ratio table.

Within a group (one operation at one shape, on one device) the benchmarks whose ``extra_info["role"]`` is set are
the yardsticks; every member gets, for each role R present, ``vs_R`` (its median over R's), ``vs_R_min`` (minimum over
minimum) and, where both carry them, ``peak_vs_R`` and ``flops_vs_R`` (``peak_mib``, ``gflops``). The ratios are
computed in the session that measured both (conftest.py), so a result file never mixes runs.

    python benchmarks/ratios.py RESULT.json [...]     # the ratio table of saved results
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys

LIBRARIES = ("torch", "triton", "transformers", "peft", "numpy", "pytest-benchmark", "liger-kernel",
             "cut-cross-entropy")
TABLE_LIMIT = 12_000  # characters: what a device call's output tail keeps
PAIRED = {"peak_mib": "peak", "gflops": "flops"}  # extra_info figures compared like the times


def annotate(benchmarks):
    """``benchmarks``: (group, name, stats, extra_info) with ``stats.median``/``stats.min`` in seconds; writes the
    ratios into each ``extra_info``."""
    groups = {}
    for group, name, stats, info in benchmarks:
        groups.setdefault(group, []).append((stats, info))
    for members in groups.values():
        yardsticks = {info["role"]: (stats, info) for stats, info in members if info.get("role")}
        for stats, info in members:
            for role, (ref, ref_info) in yardsticks.items():
                info[f"vs_{role}"] = round(stats.median / ref.median, 4)
                info[f"vs_{role}_min"] = round(stats.min / ref.min, 4)
                for key, short in PAIRED.items():
                    if _number(info.get(key)) and _number(ref_info.get(key)) and ref_info[key] > 0:
                        info[f"{short}_vs_{role}"] = round(info[key] / ref_info[key], 4)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_average() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_info(load_at_start) -> dict:
    """What changes from run to run on one machine: the load average (1, 5, 15 min) at the start and the end, and
    this checkout's commit ("+dirty" when tracked code differs from it)."""
    import provenance
    return {"load_average_at_start": load_at_start, "load_average": load_average(),
            "geffect_commit": provenance.commit()}


def environment() -> dict:
    """What the numbers depend on beside pytest-benchmark's machine_info: library versions, the instruction set
    the kernels were built for, torch's threads, the GPU."""
    import torch

    import provenance
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # the build, e.g. +cpu
    env = {"libraries": versions, "cpu_name": provenance.cpu_name(), "isa": provenance.isa(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": provenance.machine(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "cuda": torch.version.cuda}
    return env


def row(group, name, stats, info) -> dict:
    return {"group": group or "", "name": name, "median_ms": 1e3 * stats.median, "extra_info": dict(info)}


def table(rows) -> str:
    """Per group: each member's median, its ratio to the floor (and other yardsticks) and its peak memory."""
    lines = ["ratios within each group (median over the yardstick's; x floor_min: minimum over minimum)"]
    for group in dict.fromkeys(r["group"] for r in rows):
        lines.append(f"\n{group}")
        for r in (r for r in rows if r["group"] == group):
            info = r["extra_info"]
            cells = [f"{k.removeprefix('vs_')} {v:.2f}x" for k, v in info.items()
                     if k.startswith("vs_") and not k.endswith("_min") and k != "vs_floor"]
            peak = info.get("peak_mib")
            name = r["name"].split("[", 1)[-1].removesuffix("]")  # the case's id
            lines.append(f"  {name[:60]:60s} {r['median_ms']:10.3f} ms  {_x(info.get('vs_floor'))} floor "
                         f"({_x(info.get('vs_floor_min'))} floor_min)" + (f"  {', '.join(cells)}" if cells else "")
                         + (f"  peak {peak:.0f} MiB" if _number(peak) else "")
                         + (f"  [{info['role']}]" if info.get("role") else ""))
    return bounded("\n".join(lines))


def _x(value):
    return f"{value:5.2f}x" if _number(value) else "    -"


def bounded(text):
    if len(text) <= TABLE_LIMIT:
        return text
    note = f"\n... (cut at {TABLE_LIMIT} characters; every benchmark is in the JSON)"
    return text[:TABLE_LIMIT - len(note)].rsplit("\n", 1)[0] + note


def rows_of(path) -> list[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):  # a run cut short leaves its JSON empty
        print(f"{path}: no results", file=sys.stderr)
        return []
    return [{"group": b["group"] or "", "name": b["name"], "median_ms": 1e3 * b["stats"]["median"],
             "extra_info": b["extra_info"]} for b in data["benchmarks"]]


if __name__ == "__main__":
    print(table([r for path in sys.argv[1:] for r in rows_of(path)]))
