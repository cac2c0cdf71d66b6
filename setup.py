"""Installs geffect_kernels. The C++/CUDA extension is built on first use (see geffect_kernels/backends/cpp);
nothing here needs a compiler unless GEFFECT_BUILD_EXT=1 asks for an ahead-of-time build of it
(`GEFFECT_BUILD_EXT=1 pip install --no-build-isolation -e .`; the CUDA part where torch has CUDA)."""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).parent / "csrc"  # the C++/CUDA sources: the one copy in the repository
CSRC_IN_WHEEL = Path("geffect_kernels", "backends", "cpp", "csrc")  # where build.py finds them in an install


class build_py_with_csrc(build_py):
    """Copies csrc/ into the built package, so an installed wheel builds the extension on first use. An editable
    install reads csrc/ where it is (build.py looks there first)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / CSRC_IN_WHEEL
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.sh", "__pycache__"))


def extension_build():
    """ext_modules and cmdclass for the opt-in ahead-of-time build, from the same spec as the JIT build."""
    import torch

    path = Path(__file__).parent / "geffect_kernels" / "backends" / "cpp" / "build.py"
    spec = importlib.util.spec_from_file_location("geffect_csrc_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    cpp_extension = build.cpp_extension()
    kinds = ["cpu"] + (["cuda"] if torch.version.cuda and cpp_extension.CUDA_HOME else [])
    modules = []
    for kind in kinds:
        s = build.extension_spec(kind)
        make = cpp_extension.CUDAExtension if kind == "cuda" else cpp_extension.CppExtension
        compile_args = {"cxx": s["extra_cflags"], **({"nvcc": s["extra_cuda_cflags"]} if kind == "cuda" else {})}
        modules.append(make(f"geffect_kernels.backends.cpp._{kind}", s["sources"],
                            include_dirs=s["extra_include_paths"], extra_compile_args=compile_args,
                            extra_link_args=s["extra_ldflags"]))
    return {"ext_modules": modules, "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


AHEAD_OF_TIME = extension_build() if os.environ.get("GEFFECT_BUILD_EXT") == "1" else {"ext_modules": [], "cmdclass": {}}

setup(
    name="geffect_kernels",
    version="0.1.0",
    description="Fast LLM-unlearning losses (fused LM-head kernels) and G-effect profiling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["geffect_kernels", "geffect_kernels.*"]),
    package_data={"geffect_kernels": ["py.typed"]},  # csrc/ travels too: build_py_with_csrc, MANIFEST.in
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "rouge-score>=0.1.2",  # TOFU's ROUGE-L (Porter stemming)
    ],
    extras_require={"triton": ["triton>=3.0"], "hf": ["accelerate>=1.1"], "peft": ["peft>=0.13"],
                    # parquet, Arrow, save_to_disk folders (data/records.py); 14.0.0 unpickles files (CVE-2023-47248)
                    "data": ["pyarrow>=14.0.1"],
                    "test": ["pytest>=8", "pytest-benchmark>=4", "accelerate>=1.1", "setuptools>=70.1",
                             "peft>=0.13", "pyarrow>=14.0.1"]},
    entry_points={"console_scripts": ["geffect = geffect_kernels.cli:main"]},
    ext_modules=AHEAD_OF_TIME["ext_modules"],
    cmdclass={"build_py": build_py_with_csrc, **AHEAD_OF_TIME["cmdclass"]},
)
