"""The Gram ("ghost") inner product of two linear-layer weight gradients (DESIGN §4), tiled.

⟨G_aᵀX_a, G_bᵀX_b⟩_F = Σ_ij (G_a G_bᵀ)_ij (X_a X_bᵀ)_ij. On CUDA one fused kernel builds each tile of
both Gram matrices in registers. On CPU each tile of both Gram matrices comes from BLAS into reused
buffers and the C++ kernel multiplies and reduces them per row in float64; only one tile pair exists
at a time. Rows i of side a may carry segment ids (e.g. the instance they belong to), giving per-segment
partial sums (per-instance G-effects) at no extra cost.
"""
from __future__ import annotations

import time

import torch

from . import build

TILE_ROWS = 2048  # rows of a and of b per CPU tile: two 16 MiB float32 Gram tiles; smaller tiles cost BLAS speed
TORCH_TILE_ELEMENTS = 1 << 22  # elements of each Gram block `torch_gram` holds


def ghost_available(device) -> bool:
    """Whether `ghost_inner_product` runs on tensors of ``device`` here (builds the extension on first call)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and build.available("cuda")
    return device.type == "cpu" and build.available("cpu")


def _check(grad_a, input_a, grad_b, input_b, segment_ids, num_segments):
    named = {"grad_a": grad_a, "input_a": input_a, "grad_b": grad_b, "input_b": input_b}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 2-D floating-point tensor")
        if t.dtype != grad_a.dtype or t.device != grad_a.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but grad_a is {grad_a.dtype} on {grad_a.device}")
    if grad_a.shape[0] != input_a.shape[0] or grad_b.shape[0] != input_b.shape[0]:
        raise ValueError("each side's grad and input must have the same number of rows: "
                         f"{grad_a.shape[0]} vs {input_a.shape[0]}, {grad_b.shape[0]} vs {input_b.shape[0]}")
    if grad_a.shape[1] != grad_b.shape[1] or input_a.shape[1] != input_b.shape[1]:
        raise ValueError(f"feature sizes differ: grad {grad_a.shape[1]} vs {grad_b.shape[1]}, "
                         f"input {input_a.shape[1]} vs {input_b.shape[1]}")
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is given without segment_ids")
        return
    if num_segments is None or int(num_segments) < 1:
        raise ValueError("segment_ids needs num_segments >= 1")
    if segment_ids.dtype != torch.int64 or segment_ids.shape != (grad_a.shape[0],):
        raise ValueError(f"segment_ids must be int64 of shape [{grad_a.shape[0]}], got {segment_ids.dtype} "
                         f"{tuple(segment_ids.shape)}")
    if segment_ids.device != grad_a.device:
        raise ValueError(f"segment_ids are on {segment_ids.device} but the gradients on {grad_a.device}")
    if segment_ids.numel():  # a device-side assert: a GPU's host does not wait for it, a CPU raises here
        inside = (segment_ids.min() >= 0) & (segment_ids.max() < num_segments)
        try:
            torch._assert_async(inside, f"segment_ids must lie in [0, {num_segments})")
        except RuntimeError as error:
            raise ValueError(str(error)) from None


def _cpu(ext, grad_a, input_a, grad_b, input_b, segment_ids, num_segments):
    dtype = torch.float64 if grad_a.dtype == torch.float64 else torch.float32
    ga, xa, gb, xb = (t.to(dtype).contiguous() for t in (grad_a, input_a, grad_b, input_b))
    out = torch.zeros(num_segments or 1, dtype=torch.float64)
    tile = min(TILE_ROWS, max(ga.shape[0], 1)), min(TILE_ROWS, max(gb.shape[0], 1))
    gram_g = torch.empty(tile, dtype=dtype)
    gram_x = torch.empty(tile, dtype=dtype)
    for i in range(0, ga.shape[0], tile[0]):
        rows = slice(i, i + tile[0])
        n_i = ga[rows].shape[0]
        row_sums = torch.zeros(n_i, dtype=torch.float64)
        for j in range(0, gb.shape[0], tile[1]):
            cols = slice(j, j + tile[1])
            n_j = gb[cols].shape[0]
            g, x = gram_g[:n_i, :n_j], gram_x[:n_i, :n_j]
            torch.mm(ga[rows], gb[cols].t(), out=g)
            torch.mm(xa[rows], xb[cols].t(), out=x)
            ext.rowwise_dot(g, x, row_sums)
        if segment_ids is None:
            out += row_sums.sum()
        else:
            out.index_add_(0, segment_ids[rows], row_sums)
    return out


def ghost_inner_product(grad_a, input_a, grad_b, input_b, segment_ids=None, num_segments=None):
    """Σ_ij (grad_a grad_bᵀ)_ij (input_a input_bᵀ)_ij in float64, without writing either Gram matrix.

    grad_a ``[Na, d_out]``, input_a ``[Na, d_in]``, grad_b ``[Nb, d_out]``, input_b ``[Nb, d_in]`` (one dtype
    and device). Returns a 0-d float64 tensor, or with ``segment_ids`` (int64 ``[Na]`` in
    ``[0, num_segments)``) a ``[num_segments]`` float64 tensor of the partial sums over each segment's rows i.
    """
    _check(grad_a, input_a, grad_b, input_b, segment_ids, num_segments)
    if not ghost_available(grad_a.device):
        kind = "cuda" if grad_a.is_cuda else "cpu"
        raise RuntimeError(f"ghost_inner_product is not available for {grad_a.device.type} tensors here: "
                           f"{build.build_error(kind) or 'no extension for this device'}")
    num_segments = None if segment_ids is None else int(num_segments)
    if grad_a.is_cuda:
        out = build.load("cuda").ghost_inner_product_cuda(grad_a, input_a, grad_b, input_b, segment_ids,
                                                          num_segments or 1)
    else:
        out = _cpu(build.load("cpu"), grad_a, input_a, grad_b, input_b, segment_ids, num_segments)
    return out if segment_ids is not None else out[0]


def torch_gram(grad_a, input_a, grad_b, input_b, segment_ids=None, num_segments=None):
    """`ghost_inner_product` with torch ops alone (anywhere): row blocks of both Gram matrices from the BLAS
    (cuBLAS on a GPU), at most `TORCH_TILE_ELEMENTS` each, multiplied and summed per row in float64."""
    _check(grad_a, input_a, grad_b, input_b, segment_ids, num_segments)
    rows = torch.empty(grad_a.shape[0], dtype=torch.float64, device=grad_a.device)
    tile = max(1, TORCH_TILE_ELEMENTS // max(1, grad_b.shape[0]))
    gb_t, xb_t = grad_b.t(), input_b.t()
    for i in range(0, grad_a.shape[0], tile):
        block = (grad_a[i:i + tile] @ gb_t) * (input_a[i:i + tile] @ xb_t)
        rows[i:i + tile] = block.sum(1, dtype=torch.float64)
    if segment_ids is None:
        return rows.sum()
    return torch.zeros(int(num_segments), dtype=torch.float64, device=rows.device).index_add_(0, segment_ids, rows)


_CHOSEN: dict = {}  # (device, dtype, sizes rounded up to powers of two) -> (name, function), measured once


def gram_implementations(device, dtype) -> dict:
    """name -> function with `ghost_inner_product`'s contract, for tensors of ``device`` and ``dtype``: the
    csrc kernel (CUDA cores on a GPU, BLAS tiles on a CPU) where it builds, and on CUDA (or the Triton
    interpreter, float32) the Triton kernel on tensor cores; torch tiles everywhere."""
    from ..triton.config import interpreting
    device = torch.device(device)
    out = {"torch": torch_gram}
    if ghost_available(device):
        out["csrc"] = ghost_inner_product
    triton_takes = (dtype in (torch.float16, torch.bfloat16, torch.float32) if device.type == "cuda"
                    else interpreting() and dtype == torch.float32)
    if triton_takes:
        from ..triton.gram import gram_inner_product

        def triton_gram(grad_a, input_a, grad_b, input_b, segment_ids=None, num_segments=None):
            _check(grad_a, input_a, grad_b, input_b, segment_ids, num_segments)
            return gram_inner_product(grad_a, input_a, grad_b, input_b, segment_ids,
                                      None if segment_ids is None else int(num_segments))
        out["triton"] = triton_gram
    return out


def _bucket(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _time(fn, args, device):
    fn(*args)  # compile, warm caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def fastest_gram(grad_a, input_a, grad_b, input_b):
    """(name, function) of the Gram implementation to use for inputs like these, picked by measured crossover
    rather than by availability: where more than one runs, each is timed once on these very inputs (three
    calls after a warm-up; the one synchronization is paid once per dtype and power-of-two size class) and
    the faster is kept for the class. For the profiler: ``name, gram = fastest_gram(...)`` then
    ``gram(...)`` as `ghost_inner_product`."""
    device = grad_a.device
    key = (str(device), grad_a.dtype, *(_bucket(n) for n in (grad_a.shape[0], grad_b.shape[0], grad_a.shape[1],
                                                            input_a.shape[1])))
    if key not in _CHOSEN:
        found = gram_implementations(device, grad_a.dtype)
        args = (grad_a, input_a, grad_b, input_b)
        _CHOSEN[key] = min(found.items(), key=lambda item: _time(item[1], args, device)) if len(found) > 1 \
            else next(iter(found.items()))
    return _CHOSEN[key]
