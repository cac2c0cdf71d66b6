"""C++ (OpenMP) and CUDA kernels from csrc/, built with ninja on first use (see `build`).

Importing this package compiles nothing; `build_extensions` builds ahead of time, the ``cpu``/``cuda``
backends (`backend`) and `ghost_inner_product` build on first use and report unavailability instead
of failing when no compiler is present.
"""
from .build import build_error, build_extensions
from .ghost import ghost_available, ghost_inner_product

__all__ = ["build_error", "build_extensions", "ghost_available", "ghost_inner_product"]
