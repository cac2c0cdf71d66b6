"""How the G-effect profiler's cost grows with tokens, against a training step and materialized gradients.

Llama-shaped model (random weights), NPO objective (reference log-probabilities: the model's own plus noise,
so that NPO is not GA), 4 sequences per side, `measure_unlearning` with layer groups. Per configuration,
after a warm-up, the methods run in interleaved rounds (a shared machine's load then hits them alike): each
ratio is the median over rounds of the two methods' times in the same round, with its range over rounds; on the
CPU each configuration runs in a fresh process (see `measure_in_fresh_process`):

- ``step``: one fused training step: NPO on the forget batch + NLL on the retain batch, forward and backward
  (the default backend);
- ``materialized``: three full gradients (NPO, forget NLL, retain NLL) and per-parameter dot products summed
  per layer (`materialized.py`: no concatenated gradient, the fair baseline);
- ``profiler``: `GEffectProfiler.measure_unlearning` (e_u, e_r per layer, and the nll retain term's).

CPU (default): T ∈ {64, 128, 256, 512, 1024} tokens per sequence × H ∈ {256, 512}, 4 layers, V 32000, float32;
CSV under benchmarks/results/ (machine with its instruction set, load, commit) and a plot in docs/. On the CPU
each method's flops are also counted (`counted_flops`: matmuls and attention), which no load can blur.
GPU (``--gpu``): the 1.1B and 6.7B Llama shapes in bf16 at 512 and 2048 tokens per side (4 sequences of 128 and
512 tokens); ``--smoke`` runs one tiny configuration; ``--budget`` bounds the run (configurations that would
start past it are skipped and reported as such).

    python benchmarks/geffect_scaling.py [--tokens 64,128] [--hidden 256] [--rounds 3]
    python benchmarks/geffect_scaling.py --gpu [--smoke] [--budget 240] --out $OUT/geffect_scaling_gpu.csv
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import provenance
import torch
from materialized import materialized_geffects
from transformers import LlamaConfig, LlamaForCausalLM

from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.groups import parameter_groups

VOCAB, BATCH, LAYERS = 32000, 4, 4
GPU_SHAPES = {"1.1b": (22, 2048, 5632, 32, 4), "6.7b": (32, 4096, 11008, 32, 32)}  # layers, H, I, heads, kv
METHODS = ("step", "materialized", "profiler")


def build(layers, hidden, inter, heads, kv, dtype, device):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def methods(model, tokens):
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, BATCH, tokens), device=device, generator=g)
    forget, retain = {"input_ids": ids[0]}, {"input_ids": ids[1]}
    with torch.no_grad():
        lp = hf.token_logprobs(model, forget)
        ref = lp - 0.5 + 0.5 * torch.randn(lp.shape, device=device, generator=g, dtype=lp.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(model, "layer")
    npo = lambda m: hf.unlearning_loss("npo", m, forget, ref_logprobs=ref)
    nll = lambda b: lambda m: hf.unlearning_loss("nll", m, b)
    profiler = GEffectProfiler(model, groups="layer")

    def step():
        torch.autograd.grad(npo(model) + nll(retain)(model), params)

    def materialized():
        return materialized_geffects(model, npo, {"forget": nll(forget), "retain": nll(retain)}, groups)

    return {"step": step, "materialized": materialized,
            "profiler": lambda: profiler.measure_unlearning("npo", forget, retain, ref_logprobs=ref)}


def timed_rounds(runs, rounds, sync):
    """{method: [seconds per round]}, the methods interleaved in each round after one warm-up call each."""
    for fn in runs.values():  # warm-up: lazy initialisation out of the timed runs
        fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: load from other processes hits every method alike
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def counted_flops(fn) -> float:
    """Flops of one call of ``fn`` as torch's `FlopCounterMode` counts them: the matmuls and the attention,
    with what its registry lacks (in-place ``addmm_``, the head's accumulations; the CPU flash attention)
    added. Deterministic where timings are not; CPU only (a GPU's Triton kernels are not aten ops)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    extra = {aten.addmm_: lambda out, a, b, *_, out_shape=None, **__: fc.mm_flop(a, b),
             aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
             aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v)}
    with fc.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return float(counter.get_total_flops())


def measure(shape, tokens, dtype, device, rounds):
    """Per-round seconds of the three methods on one configuration (OutOfMemory: NaN), and on the CPU each
    one's counted flops (after the timed rounds: counting slows a call down)."""
    model = build(*shape, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        runs = methods(model, tokens)
        times = timed_rounds(runs, rounds, sync)
        flops = {name: counted_flops(fn) if device == "cpu" else float("nan") for name, fn in runs.items()}
        return times, flops
    except torch.OutOfMemoryError:
        return {name: [float("nan")] for name in METHODS}, {name: float("nan") for name in METHODS}
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def measure_in_fresh_process(*args):
    """`measure` in a process of its own: on the CPU the allocator's state left by one configuration (heap
    size, which blocks are mapped) otherwise changes the page faults of the next."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(torch.get_num_threads(),)) as pool:
        return pool.submit(measure, *args).result()


def paired(times, name, other):
    """Median and range over rounds of ``name``'s time over ``other``'s in the same round."""
    ratios = [a / b for a, b in zip(times[name], times[other])]
    return statistics.median(ratios), min(ratios), max(ratios)


def configurations(args):
    if not args.gpu:
        for hidden in map(int, args.hidden.split(",")):
            for tokens in map(int, args.tokens.split(",")):
                yield (f"llama L{LAYERS} H{hidden} V{VOCAB} fp32", (LAYERS, hidden, hidden * 43 // 16, 4, 4),
                       tokens, torch.float32, "cpu")
    elif args.smoke:
        yield "llama L2 H256 V32000 bf16 (smoke)", (2, 256, 688, 4, 4), 64, torch.bfloat16, "cuda"
    else:
        for shape in args.shapes.split(","):
            for per_side in (512, 2048):
                yield f"llama {shape} bf16", GPU_SHAPES[shape], per_side // BATCH, torch.bfloat16, "cuda"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64,128,256,512,1024", help="tokens per sequence (CPU)")
    parser.add_argument("--hidden", default="256,512", help="hidden sizes (CPU)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per configuration (median reported)")
    parser.add_argument("--gpu", action="store_true", help="the GPU sweep (1.1B/6.7B shapes, bf16)")
    parser.add_argument("--shapes", default="1.1b,6.7b", help="GPU shapes")
    parser.add_argument("--smoke", action="store_true", help="GPU: one tiny configuration")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; later configurations skipped")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/geffect_scaling[_gpu].csv)")
    parser.add_argument("--plot", default="docs/geffect_scaling.png", help="PNG of time against tokens (CPU)")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/geffect_scaling{'_gpu' if args.gpu else ''}.csv")
    if not args.gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    started, rows = time.perf_counter(), []
    for label, shape, tokens, dtype, device in configurations(args):
        if time.perf_counter() - started > args.budget:
            print(f"skipped (budget): {label} T {tokens}")
            continue
        run = measure if args.gpu else measure_in_fresh_process
        times, flops = run(shape, tokens, dtype, device, args.rounds)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        stamp = provenance.stamp()
        for name in METHODS:
            vs_step, step_min, step_max = paired(times, name, "step")
            rows.append({"model": label, "hidden": shape[1], "tokens_per_seq": tokens,
                         "tokens_per_side": BATCH * tokens, "method": name, "seconds": seconds[name],
                         "vs_step": vs_step, "vs_step_min": step_min,
                         "vs_step_max": step_max, "vs_materialized": paired(times, name, "materialized")[0],
                         "gflops": flops[name] / 1e9, "flops_vs_step": flops[name] / flops["step"],
                         "rounds": args.rounds, **stamp})
        ratio, low, high = paired(times, "profiler", "step")
        print(f"{label} T {tokens:5d}: step {seconds['step']:.3f}s, materialized {seconds['materialized']:.3f}s, "
              f"profiler {seconds['profiler']:.3f}s = {ratio:.2f}x step ({low:.2f}-{high:.2f} over rounds), "
              f"{paired(times, 'profiler', 'materialized')[0]:.2f}x materialized, "
              f"{flops['profiler'] / flops['step']:.2f}x a step's flops (load {stamp['load_avg']})", flush=True)
        write(rows, out)  # after every configuration: a run cut short keeps what it measured
        if not args.gpu and args.plot:
            plot(rows, Path(args.plot))
    print(f"wrote {out}" + ("" if args.gpu or not args.plot else f" and {args.plot}"))


def write(rows, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path: Path) -> Path:
    """Time against tokens per side, one panel per hidden size, one line per method (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hiddens = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(1, len(hiddens), figsize=(5 * len(hiddens), 4), squeeze=False)
    for ax, hidden in zip(axes[0], hiddens):
        for method in METHODS:
            points = sorted((r["tokens_per_side"], r["seconds"]) for r in rows
                            if r["hidden"] == hidden and r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="tokens per side (4 sequences)", ylabel="seconds",
               title=f"Llama 4 layers, H {hidden}, V {VOCAB}, NPO")
        ticks = sorted({r["tokens_per_side"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
        ax.set_xticks([], minor=True)  # no log-scale minor labels over the token counts
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    commits = ", ".join(dict.fromkeys(r["commit"] for r in rows))
    fig.suptitle(f"G-effect cost vs tokens ({rows[0]['machine']}, {rows[0]['isa']}, {commits})",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
