"""G-effects of a model sharded with FSDP2, each rank passing its slice of the global batches.

    torchrun --nproc-per-node 2 python/sharded_geffects.py          # CPU: gloo; GPUs: NCCL, one per rank

Every rank gets the G-effects of one process on the whole batches (the per-shard dot products of the
reduce-scattered gradients, one all-reduce); rank 0 prints them.
"""
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from geffect_kernels import hf
from geffect_kernels.data_parallel import rank_rows
from geffect_kernels.geffect import GEffectProfiler
from geffect_kernels.train.sharding import shard

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
torch.manual_seed(0)  # the same starting model and batches on every rank
model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4)).to(device).eval()
forget = {"input_ids": torch.randint(0, 100, (6, 16), device=device)}
retain = {"input_ids": torch.randint(0, 100, (6, 16), device=device)}
with torch.no_grad():
    ref = hf.token_logprobs(model, forget)  # the reference: the model before unlearning
shard(model, device)  # fully_shard per decoder block, then the root

mine = rank_rows(6, rank, world)
profiler = GEffectProfiler(model, groups="layer")
result = profiler.measure_unlearning("npo", {"input_ids": forget["input_ids"][mine]},
                                     {"input_ids": retain["input_ids"][mine]}, ref_logprobs=ref[mine])
if rank == 0:
    print(result.total)
    print(result.by_group["layer.0"])
dist.barrier()
dist.destroy_process_group()
