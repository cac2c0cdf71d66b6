"""Compile every kernel for sm_90 (H100) without a GPU: ``python -m geffect_kernels.backends.triton.compile_check
[WORD ...] [--sample]`` (only the variants whose label holds every WORD; ``--sample``: the first and last flag
combination of each kernel, as CI runs it); one line per variant with its registers, spill bytes and stack
frame as ptxas reports them.

A kernel that only breaks in real compilation (the interpreter runs Python, not the compiler), needs
more shared memory than an H100 block has, or whose matmul loop is not pipelined into wgmma (Hopper
tensor-core) instructions fails here. TRITON_INTERPRET must be unset: under it
`@triton.jit` builds interpreter functions, not compilable ones. Launch settings come from `config`,
so what is compiled is what runs.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

H100_SHARED_BYTES = 232448  # 227 KiB per block (opt-in maximum on sm_90)
_FLOAT_ARGS = {"softcap", "alpha", "beta", "gamma", "eps"}
_FLOAT32_BUFFERS = {"part_max_ptr", "part_sum_ptr", "target_ptr", "lse_ptr", "lse_ref_ptr", "coef_ptr", "lp_ptr",
                    "db_ptr", "tile_max_ptr", "ref_ptr", "kl_ptr", "part_ptr", "scale_ptr", "valid_ptr", "u_ptr",
                    "ur_ptr", "part_mean_ptr", "part_m2_ptr", "entropy_ptr", "var_ptr"}
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


def _flag_sets(names, needs=()):
    """Every combination of the boolean flags ``names`` that a launcher can pass; ``needs``: (flag, required)
    pairs (NEED_DB is set only with a bias)."""
    for values in itertools.product((False, True), repeat=len(names)):
        flags = dict(zip(names, values))
        if all(flags[required] or not flags[flag] for flag, required in needs):
            yield flags


KL_TARGETS = (0, 1, 2)  # kl.KL, SHIFTED (UNDIAL), OWN (CE-U)


def _target_flag_sets(names, needs=()):
    """`_flag_sets` for each reference side of the fused KL kernels (TARGET); OWN has no reference bias."""
    for target in KL_TARGETS:
        for flags in _flag_sets(names, needs):
            if not (target == 2 and flags.get("HAS_REF_BIAS")):
                yield {**flags, "TARGET": target}


def _label(kernel, dtype, flags):
    on = [k for k, v in flags.items() if v is True] + [f"{k}={v}" for k, v in flags.items() if not isinstance(v, bool)]
    return f"{kernel} {_TYPES[dtype]} " + (",".join(on) or "-")


def variants():
    """(label, kernel, dtype, constexprs, launch options, pointer-type overrides): every kernel with every
    combination of compile-time flags its launcher can pass, for 16-bit (bf16; fp16 gets the same tiles) and
    float32 inputs."""
    from . import fast_path, gram, kl, kl_fast, linear_backward, linear_forward, logits_rowwise, matmul, token_stats
    from .config import dot_precision, kl_row_tiles, matmul_tiles, row_block
    from ...catalog import OBJECTIVES
    from .weights import NO_WEIGHTS

    # every kernel code of the catalog, with whether its objective reads reference log-probabilities
    codes = {o.kernel_code: o.needs_ref for o in OBJECTIVES.values() if o.kernel_code is not None}

    def split(tiles):
        launch = tiles.launch()
        return {k: launch.pop(k) for k in ("num_warps", "num_stages")}, launch

    for dtype in (torch.bfloat16, torch.float32):
        opts, blocks = split(matmul_tiles(dtype))
        opts2, blocks2 = split(matmul_tiles(dtype, two_products=True))
        opts_acc, blocks_acc = split(matmul_tiles(dtype, accumulating=True))
        prec = {"PRECISION": dot_precision(dtype)}
        for flags in _flag_sets(("HAS_BIAS", "SOFTCAP", "STORE_EXP")):
            o, b = (opts2, blocks2) if flags["STORE_EXP"] else (opts, blocks)  # as head_logprobs launches it
            yield (_label("lse_partials", dtype, flags), linear_forward.lse_partials_kernel, dtype,
                   {**flags, **prec, **b}, o, {})
        for flags in _flag_sets(("HAS_BIAS", "SOFTCAP")):  # as head_token_stats launches it
            yield (_label("stats_partials", dtype, flags), token_stats.stats_partials_kernel, dtype,
                   {**flags, **prec, **blocks2}, opts2, {})
        for flags in _flag_sets(("HAS_BIAS", "SOFTCAP", "NEED_DB"), needs=(("NEED_DB", "HAS_BIAS"),)):
            yield (_label("token_grad", dtype, flags), linear_backward.token_grad_kernel, dtype,
                   {**flags, **prec, **blocks}, opts, {})
        # unit strides are compile-time constants after the launcher's specialization: dh = G·W (A row-major,
        # accumulating in float32) and dW = Gᵀ·h (A transposed, written in the input dtype)
        yield (f"matmul {_TYPES[dtype]} dh", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": True, "stride_ak": 1, "stride_bn": 1, "stride_cn": 1, **prec, **blocks_acc},
               opts_acc, {"c_ptr": "*fp32"})
        yield (f"matmul {_TYPES[dtype]} dW", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": False, "stride_am": 1, "stride_bn": 1, "stride_cn": 1, **prec, **blocks}, opts, {})
        for flags in _target_flag_sets(("HAS_BIAS", "HAS_REF_BIAS", "SOFTCAP")):
            yield (_label("kl_partials", dtype, flags), kl.kl_partials_kernel, dtype, {**flags, **prec, **blocks2},
                   opts2, {})
        for flags in _target_flag_sets(("HAS_BIAS", "HAS_REF_BIAS", "SOFTCAP", "NEED_DB"),
                                       needs=(("NEED_DB", "HAS_BIAS"),)):
            yield (_label("kl_grad", dtype, flags), kl.kl_grad_kernel, dtype, {**flags, **prec, **blocks2}, opts2,
                   {})
        # the fast modes: dh of a token chunk written once in the input dtype, dW summed over token chunks in float32
        yield (f"matmul {_TYPES[dtype]} dh chunk", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": False, "stride_ak": 1, "stride_bn": 1, "stride_cn": 1, **prec, **blocks}, opts, {})
        yield (f"matmul {_TYPES[dtype]} dW chunks", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": True, "stride_am": 1, "stride_bn": 1, "stride_cn": 1, **prec, **blocks_acc},
               opts_acc, {"c_ptr": "*fp32"})
        # the fast KL: both heads' logits in float32 (B = Wᵀ, unit stride along K), then the row-wise kernel
        yield (f"matmul {_TYPES[dtype]} logits", matmul.matmul_kernel, dtype,
               {"ACCUMULATE": False, "stride_ak": 1, "stride_bk": 1, "stride_cn": 1, **prec, **blocks}, opts,
               {"c_ptr": "*fp32"})
        rows, block, warps = kl_row_tiles(128256)
        for flags in _target_flag_sets(("HAS_BIAS", "HAS_REF_BIAS", "SOFTCAP", "NEED_DB"),
                                       needs=(("NEED_DB", "HAS_BIAS"),)):
            yield (_label("kl_rows", dtype, flags), kl_fast.kl_rows_kernel, dtype,
                   {**flags, "ROWS": rows, "BLOCK": block}, {"num_warps": warps}, {})
        block_a, block_b, block_k, warps, stages = gram.gram_tiles(dtype)
        yield (f"gram {_TYPES[dtype]}", gram.gram_kernel, dtype,
               {"BLOCK_A": block_a, "BLOCK_B": block_b, "BLOCK_K": block_k, **prec},
               {"num_warps": warps, "num_stages": stages}, {})
    bf16, fp32 = torch.bfloat16, torch.float32
    for kind in (NO_WEIGHTS, *sorted(codes)):
        has_ref = codes.get(kind, False)
        yield (_label("combine", fp32, {"KIND": kind}), linear_forward.combine_kernel, fp32,
               {"KIND": kind, "HAS_REF": has_ref, "BLOCK": 1024}, {"num_warps": 4}, {})
    block, warps = row_block(128256)
    for kind in (NO_WEIGHTS, *sorted(codes)):
        has_ref = codes.get(kind, False)
        for flags in _flag_sets(("SOFTCAP", "WRITE_GRAD")):
            if flags["WRITE_GRAD"] and kind == NO_WEIGHTS:
                continue
            yield (_label("logits_rows", bf16, {**flags, "KIND": kind}), logits_rowwise.logits_rows_kernel, bf16,
                   {"KIND": kind, "HAS_REF": has_ref, **flags, "BLOCK": block}, {"num_warps": warps}, {})
    for flags in _flag_sets(("SOFTCAP",)):
        yield (_label("logits_grad", bf16, flags), logits_rowwise.logits_grad_kernel, bf16, {**flags, "BLOCK": block},
               {"num_warps": warps}, {})
    for target in KL_TARGETS:
        yield (_label("kl_combine", fp32, {"TARGET": target}), kl.kl_combine_kernel, fp32,
               {"TARGET": target, "BLOCK": 1024}, {"num_warps": 4}, {})
    yield "stats_combine fp32", token_stats.stats_combine_kernel, fp32, {"BLOCK": 1024}, {"num_warps": 4}, {}
    for flags in _flag_sets(("SOFTCAP", "NEED_DB")):
        yield (_label("exp_to_grad", bf16, flags), fast_path.exp_to_grad_kernel, bf16,
               {**flags, "ROWS": fast_path._ROWS, "TILE": linear_forward.forward_tile_width(bf16)},
               {"num_warps": 4}, {})


def resource_usage(ptx: str) -> dict:
    """Registers, spill bytes and stack frame of a kernel's PTX as `ptxas -v` reports them for sm_90a (the
    ptxas that Triton carries, the one that built its cubin)."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else -1  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame")}


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
    use = resource_usage(kernel.asm["ptx"])
    spills = use["spill_stores"] + use["spill_loads"]
    return label, (f"ok: {use['registers']} registers, spills {use['spill_stores']}/{use['spill_loads']} B "
                   f"(stores/loads), stack {use['stack']} B, shared {shared} B" + ("  <- SPILLS" if spills else ""))


def main(argv=None) -> int:
    """Compile every variant (or those whose label contains each of ``argv``'s words) and print one line each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to compile", file=sys.stderr)
        return 2
    words = sys.argv[1:] if argv is None else argv
    labels = [v[0] for v in variants()]
    chosen = [i for i, label in enumerate(labels) if all(w in label for w in words if w != "--sample")]
    if "--sample" in words:  # the first and the last flag combination of each kernel and dtype (CI)
        groups = {}
        for i in chosen:
            groups.setdefault(tuple(labels[i].split()[:2]), []).append(i)
        chosen = sorted({g[0] for g in groups.values()} | {g[-1] for g in groups.values()})
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = pool.map(_compile, chosen)
        failed = 0
        for label, status in results:
            print(f"{label}: {status}", flush=True)
            failed += status.startswith("FAILED")
    print(f"{len(chosen) - failed}/{len(chosen)} kernels compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
