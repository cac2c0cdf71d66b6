"""Where a benchmark number comes from, stamped on every CSV row: the commit, the machine with the instruction set
the C++ kernels were built for, and how busy the machine was.

`stamp()` gives the columns a CPU writer appends; GPU writers put `machine()` (which names the GPU first) in theirs.
"""
import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
# Paths a benchmark run rewrites itself: changes there do not make the measured code differ from the commit.
_RESULTS = (":(exclude)benchmarks/results", ":(exclude)README.md", ":(exclude)benchmarks/README.md",
            ":(exclude)docs/*.png")


def commit() -> str:
    """Short hash of HEAD, with "+dirty" when tracked code differs from it (the numbers are then of no commit);
    GEFFECT_COMMIT where the tree was copied without .git (a lent GPU machine)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GEFFECT_COMMIT", "unknown")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *_RESULTS)
    return f"{head}+dirty" if dirty else head


def _git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()


def cpu_name() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def isa() -> str:
    """The vector instruction set torch dispatches to and the C++ extension is built for: avx512, avx2, ..."""
    import torch
    return torch.backends.cpu.get_cpu_capability().lower()


def load() -> str:
    """The 1-, 5- and 15-minute load averages: other processes on a shared machine slow every variant."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> str:
    """The GPU when one is used, then the CPU with its instruction set; core count, torch version and threads."""
    import torch
    host = f"{cpu_name()} {isa()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return f"{torch.cuda.get_device_name()}; {host}" if torch.cuda.is_available() else host


def stamp() -> dict:
    """The provenance columns of one CSV row."""
    return {"machine": machine(), "isa": isa(), "load_avg": load(), "commit": commit()}
