"""Public alias (the path docs/backends.md documents) of the C++/CUDA extension's entry points in `backends.cpp`."""
from .backends.cpp.build import build_error, build_extensions
from .backends.cpp.ghost import ghost_available, ghost_inner_product

__all__ = ["build_error", "build_extensions", "ghost_available", "ghost_inner_product"]
