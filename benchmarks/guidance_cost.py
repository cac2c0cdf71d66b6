"""What a G-effect-guided training step costs against an unguided one, on the CPU benchmark shapes.

Llama-shaped model (random weights, 4 layers, V 32000, float32), NPO objective (reference log-probabilities: the
model's own plus noise, so that NPO is not GA) plus the nll retain term, 4 sequences per side, the same steps the
training loop runs (`guidance.step`), gradients left in ``.grad`` (no optimizer update, which all three share):

- ``step``: forward of both terms, one backward of their weighted sum (the loop's unguided micro-step);
- ``rectify``: the two terms' gradients taken apart, rectified per layer, summed;
- ``instance``: the retain term's backward, then the forget batch's per-sample retaining G-effects from the step's
  own factors, the weights and the weighted gradient (`guidance.instance`).

Per configuration, after a warm-up, the methods run in interleaved rounds (a shared machine's load hits them
alike); each ratio is the median over rounds of the method's time over the step's in the same round, with its
range. CSV under benchmarks/results/ with machine, load and commit (`provenance`).

    python benchmarks/guidance_cost.py [--tokens 64,256] [--hidden 256,512] [--rounds 5]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import provenance
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from geffect_kernels import hf
from geffect_kernels.guidance import step as guided
from geffect_kernels.train import TrainConfig

VOCAB, BATCH, LAYERS = 32000, 4, 4
METHODS = ("step", "rectify", "instance")


def build(hidden, tokens):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    forget, retain = ({"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (2, BATCH, tokens)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        ref = hf.token_logprobs(model, forget) + 0.5 * torch.randn(BATCH, tokens - 1, generator=g)
    return model, forget, retain, ref


def run_of(model, forget, retain, ref):
    """What `guidance.step` reads of a `train.loop.Run`."""
    config = TrainConfig(objective="npo", retain_objective="nll", batch_size=BATCH, progress=False)
    return SimpleNamespace(
        model=model, config=config, autocast=torch.autocast("cpu", enabled=False),
        forget_batch=lambda micro: (forget, ref), retain_batch=lambda micro: retain,
        objective_loss=lambda name, batch, ref_logprobs=None, hparams=None: hf.unlearning_loss(
            name, model, batch, ref_logprobs=ref_logprobs, **(hparams or {})))


def methods(run):
    params = [p for p in run.model.parameters() if p.requires_grad]

    def clear():
        for p in params:
            p.grad = None

    def step():
        clear()
        forget, ref = run.forget_batch(0)
        loss = run.objective_loss("npo", forget, ref) + run.objective_loss("nll", run.retain_batch(0))
        loss.backward()

    def rectify():
        clear()
        guided.rectified_gradients(run, 0)

    def instance():
        clear()
        guided.instance_gradients(run, 0, 1.0)

    return {"step": step, "rectify": rectify, "instance": instance}


def measure(hidden, tokens, rounds):
    fns = methods(run_of(*build(hidden, tokens)))
    for fn in fns.values():  # warm-up: kernels built, buffers allocated
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in fns:
        ratios = [a / b for a, b in zip(times[name], times["step"])]
        rows.append({"method": name, "ms_median": round(1e3 * statistics.median(times[name]), 1),
                     "vs_step_median": round(statistics.median(ratios), 3), "vs_step_min": round(min(ratios), 3),
                     "vs_step_max": round(max(ratios), 3), "rounds": rounds,
                     "model": f"llama L{LAYERS} H{hidden} V{VOCAB} fp32", "tokens_per_side": f"{BATCH}x{tokens}",
                     **provenance.stamp()})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="64,256")
    parser.add_argument("--hidden", default="256,512")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: a shared machine's load "
                                                               "then disturbs every method alike)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "guidance_cost.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for hidden in map(int, args.hidden.split(",")):
        for tokens in map(int, args.tokens.split(",")):
            got = measure(hidden, tokens, args.rounds)
            for row in got:
                print(f"H {hidden} T {tokens} {row['method']:9s} {row['ms_median']:8.1f} ms  "
                      f"{row['vs_step_median']:.3f}x [{row['vs_step_min']:.3f}, {row['vs_step_max']:.3f}]", flush=True)
            rows += got
            with open(args.out, "w", newline="") as f:  # after every configuration: a long sweep keeps what it measured
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
