"""Rank worker: G-effects of a tiny Llama sharded with FSDP2, each rank passing its slice of the global batches
(see test_sharded_geffects.py, which compares them with one process). Writes OUT/rank<r>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerState

from geffect_kernels import hf
from geffect_kernels.data_parallel import rank_rows
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.hf_callback import GEffectCallback
from geffect_kernels.train.sharding import shard

import sharded_cases


def main(out, case):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard(sharded_cases.model(case), torch.device("cpu"))
    forget, retain, ref = sharded_cases.batches()
    mine = lambda b, n: {k: v[rank_rows(n, rank, world)] for k, v in b.items()}
    f, r = mine(forget, len(ref)), mine(retain, retain["input_ids"].shape[0])
    profiler = GEffectProfiler(model, groups="component")
    results = {name: profiler.measure_unlearning(name, f, r, ref_logprobs=ref[rank_rows(len(ref), rank, world)],
                                                 **sharded_cases.HPARAMS.get(name, {})).to_dict()
               for name in sharded_cases.OBJECTIVES}
    n = int((forget["labels"][:, 1:] != -100).sum())
    # the mean over ranks is the global mean
    part = lambda sign: lambda m: sign * world / n * -hf.token_logprobs(m, f, backend="torch").sum()
    results["generic"] = profiler.measure(part(-1.0), {"forget": part(1.0)}).to_dict()
    # the Trainer callback, handed the whole probe batches, measures this rank's slice of them
    callback = GEffectCallback(forget, retain, objective="npo", every=1, ref_logprobs=ref, groups="component",
                               **sharded_cases.HPARAMS["npo"])
    callback.on_step_begin(None, TrainerState(global_step=0), None, model=model)
    results["callback"] = callback.history.results[0].to_dict()
    grads_after = [p.grad for p in model.parameters()]
    assert all(g is None for g in grads_after), "the profiler left gradients on the model"
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
