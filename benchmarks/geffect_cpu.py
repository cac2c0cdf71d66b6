"""CPU benchmark of the G-effect profiler against the materialized method.

Tiny Llama (4 layers, H = 256, V = 32000, random weights, float32), 2×64 tokens per side. After a warm-up,
the methods run in interleaved rounds (median time per method; a shared machine's load then hits them
alike), and once more under the torch profiler for the peak of extra tensor memory (allocations made during
the call and alive at once: gradients, captures, temporaries; the model itself excluded):

- ``materialized``: the definition as plain torch computes it: three full gradients (objective, forget NLL, retain
  NLL; two alive at once), dotted parameter by parameter;
- ``measure``: `GEffectProfiler.measure` with both risks (three forward/backward passes, factored gradients);
- ``measure_unlearning``: the structured fast path for GA (forget and retain batches in one stacked decoder
  forward, one pass of the LM head over the vocabulary, head inner products in Gram form; GA's gradient is
  −1 × the forget NLL's, so one stacked backward serves all three gradients); ``measure_unlearning_npo``: the
  same for NPO (reference log-probabilities: the model's own plus noise), which needs a second backward;
- ``train_step``: forward + backward of the objective on the forget batch, for scale.

    python benchmarks/geffect_cpu.py [--out benchmarks/results/geffect_cpu.csv]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import provenance
import torch
from materialized import materialized_geffects
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from geffect_kernels import hf
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.geffect.groups import parameter_groups

LAYERS, HIDDEN, VOCAB, BATCH, TOKENS = 4, 256, 32000, 2, 64


def setup():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=688, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    forget, retain = ({"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (2, BATCH, TOKENS)))
    return model, forget, retain


def methods(model, forget, retain):
    objective = lambda m: -m(**forget).loss  # gradient ascent
    risks = {"forget": lambda m: m(**forget).loss, "retain": lambda m: m(**retain).loss}
    profiler = GEffectProfiler(model, groups="layer")
    with torch.no_grad():  # the reference model's log-probabilities, as after a few unlearning steps (at the
        # reference point itself NPO's per-sequence weights are all 1 and its gradient is GA's)
        g = torch.Generator().manual_seed(2)
        ref = hf.token_logprobs(model, forget) + 0.5 * torch.randn(BATCH, TOKENS - 1, generator=g)
    groups = parameter_groups(model, "layer")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def train_step():
        torch.autograd.grad(objective(model), [p for _, p in named])

    return {
        "train_step": train_step,
        "materialized": lambda: materialized_geffects(model, objective, risks, groups),
        "measure": lambda: profiler.measure(objective, risks),
        "measure_unlearning": lambda: profiler.measure_unlearning("ga", forget, retain, retain_objective=None),
        # NPO's coefficients are not a multiple of the NLL's: the objective needs its own decoder backward.
        "measure_unlearning_npo": lambda: profiler.measure_unlearning("npo", forget, retain, ref_logprobs=ref,
                                                                      retain_objective=None),
    }


def peak_bytes(fn):
    """Peak of the tensor memory allocated during ``fn`` and alive at once (torch profiler, CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/geffect_cpu.csv")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per method (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, forget, retain = setup()
    runs = methods(model, forget, retain)
    for fn in runs.values():  # warm-up: lazy initialisation out of the timed runs
        fn()
    # Rounds interleave the methods so that load from other processes hits them alike; median per method.
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    measured = {name: (statistics.median(times[name]) * 1e3, peak_bytes(fn) / 2**20) for name, fn in runs.items()}
    base_ms, base_mib = measured["materialized"]
    stamp = provenance.stamp()
    rows = [{"method": name, "ms_median": round(ms, 1), "peak_mib": round(mib, 1), "rounds": args.rounds,
             "time_vs_materialized": round(ms / base_ms, 3), "memory_vs_materialized": round(mib / base_mib, 3),
             "model": f"llama L{LAYERS} H{HIDDEN} V{VOCAB} fp32", "tokens_per_side": f"{BATCH}x{TOKENS}", **stamp}
            for name, (ms, mib) in measured.items()]
    for r in rows:
        print(f"{r['method']:>22}: {r['ms_median']:8.1f} ms ({r['time_vs_materialized']:.2f}x)  "
              f"peak {r['peak_mib']:7.1f} MiB ({r['memory_vs_materialized']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # The profiler's answer equals the definition (sanity check, not a timing).
    got, want = runs["measure"](), runs["materialized"]()
    for risk in want:
        err = max(abs(got.by_group[g][risk] - v) / abs(v) for g, v in want[risk].items())
        print(f"max relative difference per layer, measure vs materialized, {risk}: {err:.1e} (float32; the "
              f"materialized method's own float32 dot over 8M head entries dominates)")


if __name__ == "__main__":
    main()
