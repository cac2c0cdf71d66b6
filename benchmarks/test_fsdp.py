"""One training step of FSDP2 on one GPU beside the same step in a single process (the floor): the difference is
FSDP2's own cost, without communication between GPUs (``gpu`` marker; a smoke run: the tiny shape on the CPU with
gloo in float32).

The step is the loop's: NPO on the forget batch + NLL on the retain batch (4 sequences each), backward, AdamW update,
float32 master weights. Single process: bf16 autocast (what `train` does on CUDA). FSDP2: `sharding.shard` over a
process group of one rank (NCCL), bf16 compute with float32 reduction (what `train --nproc` does).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

import bench
from geffect_kernels import hf
from geffect_kernels.train.sharding import shard
from large_shapes import SEQS, build, token_batches

SHAPE, TOKENS = ("tiny", 8) if bench.TINY else ("1.1b", 512)


def step_fn(model, forget, retain, ref, dev, sharded):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # as the loops: bf16 autocast in one process on CUDA; under FSDP2 its policy sets the compute dtype instead
    autocast = nullcontext() if sharded or dev.type != "cuda" else torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = (hf.unlearning_loss("npo", model, forget, ref_logprobs=ref)
                    + hf.unlearning_loss("nll", model, retain))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["single process", "FSDP2, 1 rank"])
def test_fsdp_step_cost(benchmark, mode):
    dev = bench.device("gpu")
    forget, retain = token_batches(SHAPE, TOKENS, dev)
    model = build(SHAPE, torch.float32, dev)
    with torch.no_grad():
        ref = hf.token_logprobs(model, forget)
    group = f"fsdp {SHAPE} {SEQS}x{TOKENS} tokens gpu"
    if mode == "single process":
        bench.timed(benchmark, step_fn(model, forget, retain, ref, dev, False), dev, group=group, role="floor",
                    mode=mode, rounds=1 if bench.TINY else 3)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        step = step_fn(shard(model, dev), forget, retain, ref, dev, True)
        bench.timed(benchmark, step, dev, group=group, mode=mode, rounds=1 if bench.TINY else 3,
                    backend=dist.get_backend())
    finally:
        dist.barrier()
        dist.destroy_process_group()
