"""Installs geffect_kernels. The C++/CUDA extension is built on first use (see geffect_kernels/csrc);
nothing here needs a compiler."""
from setuptools import find_packages, setup

setup(
    name="geffect_kernels",
    version="0.1.0",
    description="Fast LLM-unlearning losses (fused LM-head kernels) and G-effect profiling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["geffect_kernels", "geffect_kernels.*"]),
    package_data={"geffect_kernels": ["py.typed"]},
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
    ],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest>=8", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["geffect = geffect_kernels.cli:main"]},
)
