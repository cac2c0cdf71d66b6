"""Rank worker of test_hf_trainer_distributed.py: `hf_trainer_cases.trainer` under DDP (the Trainer's own process
group, gloo on CPU processes); rank 0 writes OUT/ranks.pt (`hf_trainer_cases.summary`)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hf_trainer_cases


def main(out):
    trainer = hf_trainer_cases.trainer(out / "run", accumulate=1)
    trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "the Trainer did not start a process group"
    assert dist.get_backend() == "gloo", dist.get_backend()
    if dist.get_rank() == 0:
        torch.save(hf_trainer_cases.summary(trainer), out / "ranks.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        print(f"rank {dist.get_rank() if dist.is_initialized() else '?'} failed", file=sys.stderr)
        raise
