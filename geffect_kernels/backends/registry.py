"""Which backend runs a call: by name, by alias, or ``"auto"`` (the fastest available for the inputs).

Backends are imported on first use, so a kernel backend whose dependencies are missing costs nothing
and breaks nothing. This is also the one place that decides the fallback: inputs a backend does not take
(`Backend.accepts`: e.g. float64 or an empty batch for the Triton kernels) run on the chunked ``torch``
backend, which computes the same quantities.
"""
from __future__ import annotations

import os

import torch

from .interface import Backend

# Backends by name -> the module holding them (each module's BACKENDS maps name -> instance).
_MODULES = {
    "oracle": "geffect_kernels.backends.oracle",
    "torch": "geffect_kernels.backends.chunked",
    "triton": "geffect_kernels.backends.triton.backend",
    "cpp_cuda": "geffect_kernels.backends.cpp.backend",
    "cpp_cpu": "geffect_kernels.backends.cpp.backend",
}
# Former names, still accepted: "reference" also meant NPO's reference model, and "cpu"/"cuda" named a
# device rather than the C++ extension (Triton runs on CUDA too).
ALIASES = {"reference": "oracle", "cpu": "cpp_cpu", "cuda": "cpp_cuda"}
# `backend="auto"` tries these in order for the tensors' device type (fastest measured first).
AUTO_ORDER = {
    "cuda": ("triton", "cpp_cuda", "torch"),
    "cpu": ("cpp_cpu", "torch"),
}
FALLBACK = "torch"
_loaded: dict[str, Backend | None] = {}


class BackendUnavailable(RuntimeError):
    """A backend that exists but cannot run here (no GPU, no compiler, a missing package)."""


def _module(name: str):
    """The module of backend ``name`` (`_MODULES`) by import statements, which torch.compile runs while it traces
    (``importlib.import_module`` would break the graph on a first call)."""
    if name == "oracle":
        from . import oracle as module
    elif name == "torch":
        from . import chunked as module
    elif name == "triton":
        from .triton import backend as module
    else:
        from .cpp import backend as module
    return module


def load_backend(name: str) -> Backend | None:
    """The backend registered as ``name`` (not an alias), or None when its module cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = _module(name).BACKENDS[name]
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def own_or_fallback(backend: Backend, method: str):
    """``backend``'s ``method``, or the chunked torch backend's where ``backend`` has none of its own (an optional
    method of `Backend`, such as ``target_cross_entropy``)."""
    if getattr(type(backend), method) is getattr(Backend, method):
        backend = load_backend(FALLBACK)
    return getattr(backend, method)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` in this environment (aliases not repeated)."""
    device = torch.device(device)
    return [n for n in _MODULES if (b := load_backend(n)) is not None and b.is_available(device)]


def _named(name: str, device: torch.device) -> Backend:
    name = ALIASES.get(name, name)
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; valid: 'auto', " + ", ".join(map(repr, [*_MODULES, *ALIASES])))
    backend = load_backend(name)
    if backend is None or not backend.is_available(device):
        raise BackendUnavailable(f"backend {name!r} is not available for {device.type} tensors here; "
                           f"available: {available_backends(device)}")
    return backend


def get_backend(name: str, rows: torch.Tensor) -> Backend:
    """The backend that runs a call on ``rows`` (the flattened hidden states or logits) for ``name``
    (a name, an alias or ``"auto"``, which ``GEFFECT_BACKEND`` overrides); raises where it cannot run."""
    device = rows.device
    from_env = name == "auto" and os.environ.get("GEFFECT_BACKEND", "auto") != "auto"  # "auto" there: default
    if from_env:
        name = os.environ["GEFFECT_BACKEND"]
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, (FALLBACK,)):
            backend = load_backend(candidate)
            if backend is not None and backend.is_available(device) and backend.accepts(rows):
                return backend
        return load_backend("oracle")
    try:
        backend = _named(name, device)
    except (ValueError, BackendUnavailable) as err:
        if from_env:
            raise type(err)(f"GEFFECT_BACKEND={name}: {err}") from None
        raise
    return backend if backend.accepts(rows) else load_backend(FALLBACK)


def check_backend(name: str, device) -> None:
    """Raise now when ``name`` cannot run on ``device``: for callers that check everything before they start."""
    get_backend(name, torch.empty(0, 1, device=device))
