"""Builds and loads the C++/CUDA extension: torch.utils.cpp_extension with ninja, on first use, cached.

The C++/CUDA sources live in ``csrc/`` at the top of the repository. A wheel carries a copy of them inside the
package, next to this file (setup.py's build_py puts it there), so an installed wheel builds on first use too.
Two extensions share csrc/binding.cpp: ``cpu`` (the OpenMP kernels) and ``cuda`` (the same plus the CUDA
kernels, built only where torch has CUDA and nvcc exists). ``setup.py`` can build both ahead of
time (GEFFECT_BUILD_EXT=1) as ``geffect_kernels.backends.cpp._cpu`` / ``._cuda``; otherwise the first use
compiles them into torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions),
and later processes only load the cached library. A failed build is remembered for the process and
reported by `build_error`; nothing here ever makes ``import geffect_kernels`` fail.

csrc/check_cuda_build.sh checks by hand (not in CI) that the cuda extension compiles, links and imports
against a CUDA build of torch on a machine with nvcc but no GPU.

This file imports nothing from the package so that setup.py can load it by path.
"""
from __future__ import annotations

import glob
import importlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path


def _source_dir() -> Path:
    """The C++/CUDA sources: the checkout's top-level csrc/ (a source tree or an editable install), else the
    copy an installed wheel carries inside the package."""
    here = Path(__file__).resolve().parent
    root = here.parents[2]
    if (root / "setup.py").is_file() and (root / "csrc" / "binding.cpp").is_file():
        return root / "csrc"
    return here / "csrc"


SOURCE_DIR = _source_dir()
KINDS = ("cpu", "cuda")

_modules: dict[str, object] = {}
_errors: dict[str, str] = {}


def _isa_flags() -> tuple[str, list[str]]:
    """Vector ISA of this CPU as torch detects it: a name for the cache key and the matching flags.

    Not -march=native: the cached library must not be reused on a CPU that lacks the instructions.
    """
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512", ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma"]
    return "base", []


def extension_spec(kind: str) -> dict:
    """Name, sources and flags of one extension, for `torch.utils.cpp_extension.load` and setup.py alike."""
    isa, isa_flags = _isa_flags()
    sources = [SOURCE_DIR / "binding.cpp", *sorted((SOURCE_DIR / "cpu").glob("*.cpp"))]
    # -fno-trapping-math lets GCC if-convert the selects in csrc/cpu/vec_exp.h, so the row loops
    # vectorize on AVX2 too; it changes no result (no fast-math: IEEE rounding, NaN and order are kept).
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math", *isa_flags]
    spec = {"name": f"geffect_{kind}_{isa}", "extra_include_paths": [str(SOURCE_DIR / "include")],
            "extra_ldflags": ["-fopenmp"]}
    if kind == "cuda":
        _cuda_home()  # settles torch's CUDA_HOME before setup.py's CUDAExtension or load() reads it
        sources += sorted((SOURCE_DIR / "cuda").glob("*.cu"))
        cflags.append("-DGEFFECT_WITH_CUDA")
        spec["extra_cuda_cflags"] = ["-O3", "-std=c++17", "-DGEFFECT_WITH_CUDA"]
    spec["sources"] = [str(s) for s in sources]
    spec["extra_cflags"] = cflags
    return spec


# torch.utils.cpp_extension looks for the CUDA toolkit when it is imported, whenever torch was built with CUDA,
# and on a machine without a GPU it logs this; a CPU build has no use for the toolkit, so the line is noise.
NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _WithoutNoCudaRuntimeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_CUDA_RUNTIME)


def cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found, using CUDA_HOME=..." warning
    (every other message of torch's is kept). The CUDA build still finds the toolkit: see _cuda_home."""
    if "torch.utils.cpp_extension" not in sys.modules:
        logger, quiet = logging.getLogger("torch.utils.cpp_extension"), _WithoutNoCudaRuntimeWarning()
        logger.addFilter(quiet)
        try:
            importlib.import_module("torch.utils.cpp_extension")
        finally:
            logger.removeFilter(quiet)
    return sys.modules["torch.utils.cpp_extension"]


# Where to look for the CUDA toolkit when torch's guess has no headers (see _cuda_home); {cuda} is
# torch.version.cuda, so the toolkit torch was built with is preferred over other versions.
CUDA_HOME_FALLBACKS = ("/usr/local/cuda", "/usr/local/cuda-{cuda}", "/usr/local/cuda-*")


def _is_cuda_toolkit(path: str | None) -> bool:
    return bool(path) and all((Path(path) / part).exists() for part in ("bin/nvcc", "include/cuda_runtime.h"))


def _cuda_home() -> str | None:
    """The CUDA toolkit the cuda extension builds with: torch's ``cpp_extension.CUDA_HOME``, corrected if needed.

    Without CUDA_HOME/CUDA_PATH set, torch takes the parent of the ``nvcc`` on PATH. Where that nvcc is a
    wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc)
    the guess (/usr/local) has no headers and every compile fails on ``cuda_runtime.h``. Then, and only
    when the user set neither variable, the first toolkit in CUDA_HOME_FALLBACKS replaces the guess in
    ``cpp_extension.CUDA_HOME``, which torch reads for nvcc, the include path and the library path.
    """
    import torch

    extension = cpp_extension()
    home = extension.CUDA_HOME
    if home is None or _is_cuda_toolkit(home) or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return home
    for pattern in CUDA_HOME_FALLBACKS:
        for candidate in sorted(glob.glob(pattern.format(cuda=torch.version.cuda)), reverse=True):
            if _is_cuda_toolkit(candidate):
                extension.CUDA_HOME = candidate
                return candidate
    return home


def _why_not_buildable(kind: str) -> str | None:
    import torch

    if not (SOURCE_DIR / "binding.cpp").exists():
        return f"the C++ sources are not at {SOURCE_DIR} (an incomplete install: reinstall geffect_kernels)"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (set CXX or install g++)"
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if _cuda_home() is None:
            return "nvcc / CUDA_HOME not found"
    return None


class Unbuildable(RuntimeError):
    """A prerequisite (sources, ninja, a compiler, CUDA) is missing: unavailable, quietly."""


def _build(kind: str, verbose: bool):
    try:  # built ahead of time by setup.py
        return importlib.import_module(f"geffect_kernels.backends.cpp._{kind}")
    except ImportError:
        pass
    reason = _why_not_buildable(kind)
    if reason:
        raise Unbuildable(reason)
    return cpp_extension().load(**extension_spec(kind), verbose=verbose)


def load(kind: str, verbose: bool = False):
    """The extension module for ``kind`` ("cpu" or "cuda"), built if needed; RuntimeError if it cannot be."""
    if kind not in KINDS:
        raise ValueError(f"unknown extension kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind in _modules:
        return _modules[kind]
    if kind in _errors:
        raise RuntimeError(f"the geffect {kind} extension is unavailable: {_errors[kind]}")
    try:
        _modules[kind] = _build(kind, verbose)
    except Exception as exc:  # a compiler error, a missing tool, a bad cache: all mean "unavailable"
        _errors[kind] = str(exc) if isinstance(exc, Unbuildable) else f"{type(exc).__name__}: {exc}".strip()
        if not isinstance(exc, Unbuildable):  # a build that should have worked: say so, once
            warnings.warn(f"geffect_kernels: building the {kind} extension failed; the '{kind}' backend is "
                          f"unavailable ({_errors[kind][:500]})", RuntimeWarning, stacklevel=2)
        raise RuntimeError(f"the geffect {kind} extension is unavailable: {_errors[kind]}") from exc
    return _modules[kind]


def available(kind: str) -> bool:
    """Whether the extension loads (building it on the first call); never raises."""
    try:
        load(kind)
        return True
    except RuntimeError:
        return False


def build_error(kind: str) -> str | None:
    """Why the last build of ``kind`` failed in this process (None if it did not fail or was not tried)."""
    return _errors.get(kind)


def build_extensions(verbose: bool = True) -> list[str]:
    """Build every extension this machine can build, ahead of first use; returns (and prints) what was built."""
    built = []
    for kind in KINDS:
        reason = _why_not_buildable(kind)
        if reason is None:
            try:
                module = load(kind, verbose=verbose)
                built.append(module.__file__)
            except RuntimeError as exc:
                reason = str(exc)
        if verbose:
            print(f"geffect {kind} extension: " + (built[-1] if reason is None else f"not built ({reason})"))
    return built
