"""What every suite shares: the size switches, the device parameter, a timed call (the device synchronised) and
the roles from which conftest.py computes each group's ratios.

- ``GEFFECT_BENCH_QUICK=1``: tiny shapes, one round (CI runs every benchmark's code this way, untimed);
- ``GEFFECT_BENCH_GPU_SMOKE=1``: the ``gpu`` tests on the CPU, Triton interpreted, tiny shapes (the GPU suite's
  plumbing, `run_gpu_suite.sh --smoke`);
- a benchmark's ``extra_info["role"]`` names it as its group's yardstick: ``floor`` (every group has one: the work
  any method must do, or the step a method is weighed against) and optionally others (``naive``,
  ``materialized``); every member of the group then gets ``vs_<role>`` = its median over the yardstick's.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

QUICK = os.environ.get("GEFFECT_BENCH_QUICK") == "1"
GPU_SMOKE = os.environ.get("GEFFECT_BENCH_GPU_SMOKE") == "1"
TINY = QUICK or GPU_SMOKE
ROUNDS = 1 if TINY else 3  # after one warm-up round; a group's members run one after another
MMAP_THRESHOLD = 1 << 20  # glibc: freed blocks above it go back to the system, so the resident peak follows tensors

# The device parameter of a suite: "gpu" cases carry the gpu marker (skipped without CUDA unless GPU_SMOKE).
CPU = pytest.param("cpu", id="cpu")
GPU = pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)


def device(where: str) -> torch.device:
    """The torch device of a case: "gpu" is CUDA, or the CPU in a smoke run."""
    return torch.device("cuda" if where == "gpu" and not GPU_SMOKE else "cpu")


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(benchmark, fn, dev, *, group, role=None, rounds=None, setup=None, **extra):
    """``benchmark.pedantic`` of ``fn`` (after one warm-up round), each round waited for on a GPU; ``setup`` (untimed,
    also waited for) returns ``(args, kwargs)``. ``extra`` goes to ``extra_info`` beside the device and the role."""
    benchmark.group = group
    benchmark.extra_info.update(device=str(dev), **({"role": role} if role else {}), **extra)

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync(dev)
        return out

    def prepared():
        made = setup()
        sync(dev)
        return made

    return benchmark.pedantic(run, setup=prepared if setup else None, rounds=rounds or ROUNDS,
                              warmup_rounds=0 if TINY else 1)


def cuda_peak_mib(fn, dev) -> float:
    """Peak of the CUDA allocator during one call of ``fn`` above what was allocated before it."""
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_peak_mib(fn) -> float:
    """Growth of this process's peak resident memory (VmHWM, restarted at the current RSS) during one call."""
    base = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return status_mib("VmHWM") - base


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
import bench, {module} as suite
step = suite.{factory}(*{params!r})
step()  # warm-up: libraries loaded, kernels built, threads started
print(bench.resident_peak_mib(step))
"""


def fresh_process_peak_mib(module: str, factory: str, *params) -> float:
    """Peak resident growth (MiB) of one call of ``module.factory(*params)()`` beyond its inputs, measured in a fresh
    process after a warm-up call (another case's allocator state cannot flatter it), glibc's mmap threshold fixed;
    in a tiny run, in this process (the same code, without the process start)."""
    if TINY:
        step = getattr(__import__(module), factory)(*params)
        step()
        return resident_peak_mib(step)
    import subprocess
    import sys
    script = _PEAK_SCRIPT.format(here=str(Path(__file__).parent), threads=torch.get_num_threads(), module=module,
                                 factory=factory, params=params)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
        raise RuntimeError(f"peak of {module}.{factory}{params}: {done.stderr.strip()[-2000:]}")
    return float(done.stdout.split()[-1])


def tensor_peak_mib(fn) -> float:
    """Peak of the tensor memory allocated during one call of ``fn`` and alive at once (torch profiler, CPU): what
    the call adds, the model and its inputs excluded, independent of the allocator."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20
