"""The package installs whole: a wheel built from the tracked files carries the C++/CUDA sources, and an
install of it alone (no source checkout on the path) builds and lists the C++ backend."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = """
import sys
import geffect_kernels as gk
from geffect_kernels.backends.cpp import build
assert gk.__file__.startswith(sys.argv[1]), gk.__file__
assert build.SOURCE_DIR.is_relative_to(sys.argv[1]), build.SOURCE_DIR
print(" ".join(gk.available_backends("cpu")))
print(build.build_error("cpu"))
"""


def _run(*args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_installs_with_its_cpp_sources(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from the tracked files)")
    source = tmp_path / "source"
    for name in _run("git", "-C", str(REPO), "ls-files", "-z").split("\0"):
        if name and (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source), timeout=300)
    wheel, = (tmp_path / "dist").glob("geffect_kernels-*.whl")
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel), timeout=300)
    assert (site / "geffect_kernels" / "backends" / "cpp" / "csrc" / "binding.cpp").is_file()  # a copy of csrc/
    assert (site / "geffect_kernels" / "py.typed").is_file()  # type checkers read the package's annotations
    # a fresh process that sees only the install (not the checkout), with its own extension cache
    env = {**os.environ, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    backends, error = _run(sys.executable, "-c", CHECK, str(site), cwd=tmp_path, env=env, timeout=600).splitlines()
    if shutil.which("ninja") and shutil.which("c++"):
        assert "cpp_cpu" in backends.split(), error
    else:
        assert "sources are not at" not in error
