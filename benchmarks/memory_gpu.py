"""One LoRA NPO step with gradient checkpointing on a large Llama shape: its peak memory next to the memory plan's.

    python benchmarks/memory_gpu.py --csv OUT.csv --shape 6.7b --tokens 512   # on a GPU (run_gpu_large.sh)
    python benchmarks/memory_gpu.py --csv OUT.csv --smoke                     # CPU, the tiny shape (CI)

The model is built from its config with random weights in bf16 on the device (`large_shapes.build`), LoRA r 8 on
q_proj and v_proj is added, and `train` runs one step of NPO with an NLL retain term on `large_shapes.SEQS`
random sequences per side (its reference log-probabilities computed first, by the model itself). On a GPU the
peak is ``torch.cuda.max_memory_allocated`` over the whole run (weights included); on the CPU the peak resident
memory above the process before the model was built. The row says whether every lora_B moved from zero.
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

from large_shapes import SEQS, SHAPES, build  # noqa: E402
from provenance import commit, machine  # noqa: E402

COLUMNS = ["shape", "tokens", "sequences", "device", "peak_mib", "plan_mib", "plan_vs_measured", "every_lora_b_moved",
           "seconds", "status", "machine", "commit"]


def _rss_mib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def planned_bytes(shape, tokens, device) -> int:
    from geffect_kernels.train.memory_plan import ModelShape, PlanSettings, plan

    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    model_shape = ModelShape(layers, hidden, inter, heads, kv, hidden // heads, vocab, False)
    settings = PlanSettings(objective="npo", retain_objective="nll", batch_size=SEQS, seq_len=tokens, n_forget=SEQS,
                            dtype="bfloat16", lora_r=8, gradient_checkpointing=True,
                            device="cpu" if device == "cpu" else "cuda")
    return plan(model_shape, settings).peak


def measure(shape, tokens, device) -> dict:
    from geffect_kernels.data.prompts import EncodedSet
    from geffect_kernels.train import TrainConfig, train
    from geffect_kernels.train.lora import add_lora

    cuda = device.startswith("cuda")
    vocab = SHAPES[shape][-1]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, SEQS, tokens), generator=g).tolist()
    forget, retain = (EncodedSet([{"input_ids": row, "labels": row} for row in side], 0) for side in ids)
    config = TrainConfig(objective="npo", retain_objective="nll", steps=1, batch_size=SEQS, lr=1e-4,
                         gradient_checkpointing=True, progress=False, checkpoint_every=1000)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    model = add_lora(build(shape, torch.bfloat16, device), r=8, targets=["q_proj", "v_proj"])
    train(model, forget, retain, config)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _rss_mib("VmHWM") - base
    moved = all(bool((p.detach() != 0).any()) for name, p in model.named_parameters() if "lora_B" in name)
    return {"peak_mib": round(peak, 1), "every_lora_b_moved": moved, "seconds": round(time.perf_counter() - start, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--csv", required=True)
    parser.add_argument("--shape", default="6.7b", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny shape")
    args = parser.parse_args()
    shape, tokens = ("tiny", 16) if args.smoke else (args.shape, args.tokens)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    row = {"shape": shape, "tokens": tokens, "sequences": SEQS, "device": device, "machine": machine(),
           "commit": os.environ.get("GEFFECT_COMMIT") or commit()}
    plan_mib = planned_bytes(shape, tokens, device) / 2**20
    try:
        row.update(measure(shape, tokens, device))
        row.update(plan_mib=round(plan_mib, 1), plan_vs_measured=round(plan_mib / row["peak_mib"], 3),
                   status="ok" if row["every_lora_b_moved"] else "lora_B stayed at zero")
    except torch.cuda.OutOfMemoryError as err:
        row.update(plan_mib=round(plan_mib, 1), status=f"out of memory: {str(err).splitlines()[0][:200]}")
    new = not Path(args.csv).is_file()
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(", ".join(f"{k} {row.get(k)}" for k in ("shape", "tokens", "device", "peak_mib", "plan_mib",
                                                   "plan_vs_measured", "every_lora_b_moved", "status")))
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
