"""Installs geffect_kernels. The C++/CUDA extension is built on first use (see geffect_kernels/backends/cpp);
nothing here needs a compiler unless GEFFECT_BUILD_EXT=1 asks for an ahead-of-time build of it
(`GEFFECT_BUILD_EXT=1 pip install --no-build-isolation -e .`; the CUDA part where torch has CUDA)."""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup


def extension_build():
    """ext_modules and cmdclass for the opt-in ahead-of-time build, from the same spec as the JIT build."""
    import torch
    from torch.utils import cpp_extension

    path = Path(__file__).parent / "geffect_kernels" / "backends" / "cpp" / "build.py"
    spec = importlib.util.spec_from_file_location("geffect_csrc_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
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


setup(
    name="geffect_kernels",
    version="0.1.0",
    description="Fast LLM-unlearning losses (fused LM-head kernels) and G-effect profiling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["geffect_kernels", "geffect_kernels.*"]),
    # the C++/CUDA sources travel inside the package, so an installed wheel builds the extension on first use
    package_data={"geffect_kernels": ["py.typed"],
                  "geffect_kernels.backends.cpp": ["csrc/*.cpp", "csrc/cpu/*", "csrc/cuda/*",
                                                   "csrc/include/geffect/*"]},
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
    **(extension_build() if os.environ.get("GEFFECT_BUILD_EXT") == "1" else {}),
)
