"""Rank worker of test_distributed_loop.py: `train_sharded` with an evaluate hook and the progress bar asked for,
then the same folder under other settings, refused (resume=None) and started over (resume=False).
Writes OUT/rank<r>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from geffect_kernels.train import ResumeMismatch, loop
from geffect_kernels.train.distributed import train_sharded

import loop_cases


def main(workspace, out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bars, real_tqdm = [], loop.tqdm
    # what each rank's progress bar is told (None: shown on a terminal; True: never), none drawn here
    loop.tqdm = lambda *args, **kwargs: bars.append(kwargs["disable"]) or real_tqdm(*args, **{**kwargs,
                                                                                                 "disable": True})
    forget, retain = loop_cases.data(workspace)
    folder, model, cpu = out / "run", workspace / "model", torch.device("cpu")
    first = train_sharded(model, forget, retain, loop_cases.config(folder, progress=True), device=cpu,
                          evaluate=loop_cases.probe(forget))
    if rank == 0:
        (folder / "checkpoint.pt").write_bytes(b"a one-process checkpoint")  # starting over removes it too
    dist.barrier()
    other = loop_cases.config(folder, steps=3, lr=0.02, eval_every=0)
    try:
        train_sharded(model, forget, retain, other, device=cpu)
        refused = None
    except ResumeMismatch as err:
        refused = str(err)
    again = train_sharded(model, forget, retain, other, device=cpu, resume=False)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "bars": bars, "first": first.metrics, "refused": refused, "again": again.metrics,
        "resumed_from": again.resumed_from, "one_process_checkpoint": (folder / "checkpoint.pt").exists()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
