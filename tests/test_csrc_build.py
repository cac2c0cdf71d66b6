"""Building the extension: failures are cached and reported (never raised by import or availability
checks), the CUDA sources compile with plain nvcc, and the CPU kernel's hot loops vectorize."""
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from geffect_kernels.backends.cpp import build
from geffect_kernels.backends.cpp.backend import BACKENDS
from geffect_kernels.backends import registry as dispatch
from csrc_cases import require_extension


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    """A fresh build state whose sources are missing, so any build fails."""
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "_errors", {})
    monkeypatch.setattr(dispatch, "_loaded", {})
    attempts = []
    real_build = build._build
    monkeypatch.setattr(build, "_build", lambda kind, verbose: attempts.append(kind) or real_build(kind, verbose))
    return attempts


def test_failed_build_is_cached_reported_and_falls_back(no_sources, monkeypatch):
    monkeypatch.setattr(build, "_why_not_buildable", lambda kind: None)  # a build that should work, then fails
    with pytest.warns(RuntimeWarning, match="cpu extension failed"):
        assert build.available("cpu") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not on every call
        assert build.available("cpu") is False
        assert dispatch.get_backend("auto", torch.zeros(1, 1)).name == "torch"
    assert no_sources == ["cpu"]
    assert "binding.cpp" in build.build_error("cpu")
    with pytest.raises(RuntimeError, match="'cpp_cpu' is not available"):
        dispatch.get_backend("cpu", torch.zeros(1, 1))  # the alias of cpp_cpu


def test_the_sources_are_the_top_level_csrc_only():
    repo = Path(__file__).resolve().parents[1]
    assert build.SOURCE_DIR == repo / "csrc" and (repo / "csrc" / "binding.cpp").is_file()
    assert not (repo / "geffect_kernels" / "backends" / "cpp" / "csrc").exists()  # no second copy


def test_missing_prerequisites_mean_unavailable_quietly(no_sources):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.available("cpu") is False
    assert "sources are not at" in build.build_error("cpu")


def test_cuda_backend_without_cuda_is_unavailable_not_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert BACKENDS["cpp_cuda"].is_available(torch.device("cuda")) is False
    assert "cpp_cuda" not in dispatch.available_backends("cuda")


def test_build_extensions_reports_what_it_built(capsys):
    require_extension("cpu")
    built = build.build_extensions(verbose=True)
    assert any("geffect_cpu" in path for path in built)
    out = capsys.readouterr().out
    assert "geffect cpu extension:" in out and "geffect cuda extension:" in out


@pytest.mark.parametrize("source", sorted((build.SOURCE_DIR / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_with_plain_nvcc(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    # with the flags torch's build adds (-D__CUDA_NO_HALF_OPERATORS__ and the like, --expt-relaxed-constexpr)
    result = subprocess.run([nvcc, *cpp_extension.COMMON_NVCC_FLAGS, *build.extension_spec("cuda")["extra_cuda_cflags"],
                             "-gencode=arch=compute_90,code=sm_90", f"-I{build.SOURCE_DIR / 'include'}", "-c",
                             str(source), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def _fake_toolkit(root, headers=True):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").touch()
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").touch()
    return str(root)


def test_cuda_home_falls_back_when_torchs_guess_has_no_headers(tmp_path, monkeypatch):
    """torch guesses CUDA_HOME as the parent of the nvcc on PATH; a wrapper nvcc (/usr/local/bin/nvcc)
    makes that /usr/local, where cuda_runtime.h is missing and every CUDA compile would fail."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    wrapper_home = _fake_toolkit(tmp_path / "local", headers=False)
    _fake_toolkit(tmp_path / "cuda-12.4")
    _fake_toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setattr(build, "CUDA_HOME_FALLBACKS", (str(tmp_path / "cuda"), str(tmp_path / "cuda-{cuda}"),
                                                       str(tmp_path / "cuda-*")))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", wrapper_home)
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # the toolkit torch was built with comes first
    assert build._cuda_home() == str(tmp_path / "cuda-12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", wrapper_home)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # else the newest
    assert build._cuda_home() == str(tmp_path / "cuda-13.0")
    assert cpp_extension.CUDA_HOME == build._cuda_home()
    # a usable guess, an explicit CUDA_HOME and no guess at all are left as they are
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda-12.4"))
    assert build._cuda_home() == str(tmp_path / "cuda-12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", wrapper_home)
    monkeypatch.setenv("CUDA_HOME", wrapper_home)
    assert build._cuda_home() == wrapper_home
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert build._cuda_home() is None


def test_every_simd_loop_of_the_cpu_kernels_vectorizes(tmp_path):
    """Each loop marked `#pragma omp simd` must appear in GCC's vectorization report (which names the
    pragma's line, the loop's, or the first statement of its body)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    source = build.SOURCE_DIR / "cpu" / "row_loss.cpp"
    result = subprocess.run([compiler, "-std=c++17", "-O3", "-fopenmp", "-fno-trapping-math", "-mavx2", "-mfma",
                             "-fopt-info-vec-optimized",
                             f"-I{build.SOURCE_DIR / 'include'}", "-c", str(source), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = source.read_text().splitlines()
    simd_loops = [i + 1 for i, line in enumerate(lines) if line.strip().startswith("#pragma omp simd")]
    vectorized = {int(m) for m in re.findall(r"row_loss\.cpp:(\d+):\d+: optimized: loop vectorized", result.stderr)}
    assert len(simd_loops) >= 6
    missed = [line for line in simd_loops if not set(range(line, line + 4)) & vectorized]
    assert not missed, f"loops not vectorized after the pragmas on lines {missed}"


FAKE_CUDA_TORCH = """
import torch
torch.version.cuda = "12.8"  # a torch built with CUDA (the PyPI wheel) on a machine without a GPU
torch.cuda._is_compiled = lambda: True
torch.cuda.is_available = lambda: False
"""


def _stderr_of(code, tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}  # a toolkit for torch to find
    done = subprocess.run([sys.executable, "-c", FAKE_CUDA_TORCH + code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_a_cpu_build_says_nothing_of_cuda(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is imported by a torch
    built with CUDA on a machine without a GPU; the CPU extension's build must not pass that on."""
    assert build.NO_CUDA_RUNTIME in _stderr_of("import torch.utils.cpp_extension", tmp_path)  # what torch does
    stderr = _stderr_of("from geffect_kernels.backends.cpp import build\nprint(build.available('cpu'))\n"
                        "import torch.utils.cpp_extension as c\nassert c.CUDA_HOME, c.CUDA_HOME", tmp_path)
    assert build.NO_CUDA_RUNTIME not in stderr, stderr
