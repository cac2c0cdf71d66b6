"""C++ (OpenMP) and CUDA kernels from the top-level csrc/, built with ninja on first use (see `build`).

Importing this package compiles nothing; `build_extensions` builds ahead of time, the ``cpu``/``cuda``
backends (`backend`) and `ghost_inner_product` build on first use and report unavailability instead
of failing when no compiler is present. The public entry points are re-exported by `geffect_kernels.csrc`.
"""
