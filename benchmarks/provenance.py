"""Where a benchmark number comes from: the commit and the machine, stamped on every CSV row."""
import os
import pathlib
import platform
import subprocess


def commit() -> str:
    """Short hash of HEAD; GEFFECT_COMMIT where the tree was copied without .git (a lent GPU machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GEFFECT_COMMIT", "unknown")


def cpu_name() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """The GPU when one is used, else the CPU; with core count, torch version and threads."""
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return f"{device}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
