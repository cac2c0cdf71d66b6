"""Public alias (the path the README documents) of the C++/CUDA extension's entry points in `backends.cpp`."""
from .backends.cpp import build_error, build_extensions, ghost_available, ghost_inner_product

__all__ = ["build_error", "build_extensions", "ghost_available", "ghost_inner_product"]
