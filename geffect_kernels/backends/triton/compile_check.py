"""Compile every kernel for sm_90 (H100) without a GPU: ``python -m geffect_kernels.backends.triton.compile_check``.

A kernel that only breaks in real compilation (the interpreter runs Python, not the compiler), needs
more shared memory than an H100 block has, or whose matmul loop is not pipelined into wgmma (Hopper
tensor-core) instructions fails here. TRITON_INTERPRET must be unset: under it
`@triton.jit` builds interpreter functions, not compilable ones. Launch settings come from `config`,
so what is compiled is what runs.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

H100_SHARED_BYTES = 232448  # 227 KiB per block (opt-in maximum on sm_90)
_FLOAT_ARGS = {"softcap", "scale", "alpha", "beta", "gamma", "eps"}
_FLOAT32_BUFFERS = {"part_max_ptr", "part_sum_ptr", "target_ptr", "lse_ptr", "lse_ref_ptr", "coef_ptr", "lp_ptr",
                    "db_ptr", "tile_max_ptr", "ref_ptr", "kl_ptr", "part_ptr"}
_COUNTS = {"ignore_index", "tiles_per_split", "n_splits"}
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _divisible(fn, signature):
    """What the launcher's specialization sees at LLM sizes (H 4096, V 128256, N 8192): aligned pointers,
    sizes and strides divisible by 16 (counts such as the number of splits aside)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or (signature[name] == "i32" and name not in _COUNTS)}


def _signature(fn, dtype, constexprs, overrides):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name in _FLOAT32_BUFFERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + _TYPES[dtype]
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def variants():
    """(label, kernel, dtype, constexprs, launch options, pointer-type overrides) for every kernel."""
    from . import fast_path, kl, linear_backward, linear_forward, logits_rowwise, matmul
    from .config import dot_precision, matmul_tiles, row_block

    def split(tiles):
        launch = tiles.launch()
        return {k: launch.pop(k) for k in ("num_warps", "num_stages")}, launch

    for dtype in (torch.bfloat16, torch.float32):
        name = _TYPES[dtype]
        opts, blocks = split(matmul_tiles(dtype))
        opts2, blocks2 = split(matmul_tiles(dtype, two_products=True))
        prec = {"PRECISION": dot_precision(dtype)}
        for flags in ({"HAS_BIAS": False, "SOFTCAP": False, "STORE_EXP": False},
                      {"HAS_BIAS": True, "SOFTCAP": True, "STORE_EXP": True}):
            yield (f"lse_partials {name} {flags}", linear_forward.lse_partials_kernel, dtype,
                   {**flags, **prec, **blocks}, opts, {})
        for flags in ({"HAS_BIAS": False, "SOFTCAP": False, "NEED_DB": False},
                      {"HAS_BIAS": True, "SOFTCAP": True, "NEED_DB": True}):
            yield (f"token_grad {name} {flags}", linear_backward.token_grad_kernel, dtype,
                   {**flags, **prec, **blocks}, opts, {})
        # unit strides are compile-time constants after the launcher's specialization: dh = G·W (A row-major,
        # accumulating in float32) and dW = Gᵀ·h (A transposed, written in the input dtype)
        yield (f"matmul {name} dh", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": True, "stride_ak": 1, "stride_bn": 1, "stride_cn": 1, **prec, **blocks}, opts,
               {"c_ptr": "*fp32"})
        yield (f"matmul {name} dW", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": False, "stride_am": 1, "stride_bn": 1, "stride_cn": 1, **prec, **blocks}, opts, {})
        flags = {"HAS_BIAS": True, "HAS_REF_BIAS": True, "SOFTCAP": True}
        yield f"kl_partials {name}", kl.kl_partials_kernel, dtype, {**flags, **prec, **blocks2}, opts2, {}
        yield (f"kl_grad {name}", kl.kl_grad_kernel, dtype, {**flags, "NEED_DB": True, **prec, **blocks2}, opts2,
               {})
    bf16 = torch.bfloat16
    block, warps = row_block(128256)
    for kind, has_ref in ((2, False), (4, True)):
        yield (f"combine kind={kind}", linear_forward.combine_kernel, torch.float32,
               {"KIND": kind, "HAS_REF": has_ref, "BLOCK": 1024}, {"num_warps": 4}, {})
        yield (f"logits_rows kind={kind}", logits_rowwise.logits_rows_kernel, bf16,
               {"KIND": kind, "HAS_REF": has_ref, "SOFTCAP": True, "WRITE_GRAD": True, "BLOCK": block},
               {"num_warps": warps}, {})
    yield ("logits_grad", logits_rowwise.logits_grad_kernel, bf16, {"SOFTCAP": True, "BLOCK": block},
           {"num_warps": warps}, {})
    yield "kl_combine", kl.kl_combine_kernel, torch.float32, {"BLOCK": 1024}, {"num_warps": 4}, {}
    yield ("exp_to_grad", fast_path.exp_to_grad_kernel, bf16,
           {"SOFTCAP": True, "NEED_DB": True, "ROWS": fast_path._ROWS,
            "TILE": matmul_tiles(bf16).block_n}, {"num_warps": 4}, {})


def _compile(index):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, fn, dtype, constexprs, options, overrides = list(variants())[index]
    signature = _signature(fn, dtype, constexprs, overrides)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_divisible(fn, signature))
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:  # report every failure, not just the first
        return label, f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    shared = kernel.metadata.shared
    if shared > H100_SHARED_BYTES:
        return label, f"FAILED: needs {shared} bytes of shared memory, H100 has {H100_SHARED_BYTES}"
    ttgir = kernel.asm["ttgir"]
    if "PRECISION" in constexprs and not ("warp_group_dot" in ttgir and "async_copy_global_to_local" in ttgir):
        return label, "FAILED: main loop not pipelined on tensor cores (no wgmma fed by async copies)"
    return label, f"ok (shared {shared} B)"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to compile", file=sys.stderr)
        return 2
    count = len(list(variants()))
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile, range(count)))
    failed = 0
    for label, status in results:
        print(f"{label}: {status}")
        failed += status.startswith("FAILED")
    print(f"{count - failed}/{count} kernels compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
