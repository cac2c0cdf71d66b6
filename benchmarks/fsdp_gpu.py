"""One training step of FSDP2 on one GPU next to the same step in a single process, the second
part of `run_gpu_large.sh`: step time and peak memory of each, one CSV row each, appended as measured.

The step is the loop's: NPO on the forget batch + NLL on the retain batch (4 sequences each), backward, AdamW
update, float32 master weights. Single process: bf16 autocast (what `train` does on CUDA). FSDP2: `sharding.shard`
over a process group of one rank (NCCL), bf16 compute with float32 reduction (what `train --nproc` does): the
difference between the two rows is FSDP2's own cost, without any communication between GPUs.

    python benchmarks/fsdp_gpu.py --csv FILE [--shape 1.1b] [--tokens 512] [--smoke]

``--smoke``: the tiny shape on the CPU with gloo in float32 (the plumbing, for CI).
"""
from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from large_shapes import SEQS, build, timed, token_batches
from suite_report import Recorder

from geffect_kernels import hf
from geffect_kernels.train.sharding import shard


def step_fn(model, forget, retain, ref, device, sharded):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # as the loops: bf16 autocast in one process on CUDA; under FSDP2 its policy sets the compute dtype instead
    autocast = nullcontext() if sharded or device.type != "cuda" else torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = (hf.unlearning_loss("npo", model, forget, ref_logprobs=ref)
                    + hf.unlearning_loss("nll", model, retain))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True)
    parser.add_argument("--shape", default="1.1b")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence (4 sequences per side)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = "tiny" if args.smoke else args.shape
    where = f"{shape} {SEQS}x{args.tokens} tokens per side"
    rec = Recorder(args.csv, "fsdp")
    forget, retain = token_batches(shape, args.tokens, device)
    ids = dict(provider=shape, shape=where, dtype="fp32" if args.smoke else "bf16 compute, fp32 weights")
    with rec.case(**ids, case="single process"):
        model = build(shape, torch.float32, device)
        with torch.no_grad():
            ref = hf.token_logprobs(model, forget)
        ms, mib = timed(step_fn(model, forget, retain, ref, device, False), args.repeats, device)
        rec.row(**ids, case="single process", status="ok", ms_median=ms, peak_mib=mib)
        del model
    with rec.case(**ids, case="FSDP2, 1 rank"):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        try:
            model = shard(build(shape, torch.float32, device), device)
            ms, mib = timed(step_fn(model, forget, retain, ref, device, True), args.repeats, device)
            rec.row(**ids, case="FSDP2, 1 rank", status="ok", ms_median=ms, peak_mib=mib,
                    note="NCCL" if device.type == "cuda" else "gloo")
        finally:
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
