"""Rank worker of test_hf_shards.py: load MODEL_DIR straight into FSDP2 shards (plain and with LoRA), record what
each rank read and computed, and save both back. Writes OUT/rank<r>.pt, OUT/full/ and OUT/lora/."""
import sys
from pathlib import Path

import safetensors
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from geffect_kernels.geffect.sharded import reshard
from geffect_kernels.train.hf_shards import load_sharded, local_part, save_sharded
from geffect_kernels.train.lora import add_lora

from hf_shards_cases import IDS, LORA


class CountingOpen:
    """``safetensors.safe_open`` that counts the elements of every slice read through it."""
    read = 0

    def __init__(self, *args, **kwargs):
        self.file = safe_open(*args, **kwargs)

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def get_slice(self, key):
        return CountingSlice(self.file.get_slice(key))


class CountingSlice:
    def __init__(self, stored):
        self.stored = stored

    def get_shape(self):
        return self.stored.get_shape()

    def __getitem__(self, index):
        part = self.stored[index]
        CountingOpen.read += part.numel()
        return part


def refuse_whole_load(*args, **kwargs):
    raise AssertionError("from_pretrained called: a rank loaded the whole model")


safe_open = safetensors.safe_open


def main(model_dir, out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    safetensors.safe_open = CountingOpen
    AutoModelForCausalLM.from_pretrained = refuse_whole_load
    cpu = torch.device("cpu")
    result = {}
    for case, wrap in (("full", None), ("lora", lambda m: add_lora(m, **LORA))):
        CountingOpen.read = 0
        model = load_sharded(model_dir, cpu, wrap=wrap)
        local = {name: local_part(p)[0].numel() for name, p in model.named_parameters()}
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        reshard(model)
        adapters = {name: p.full_tensor() for name, p in model.named_parameters() if "lora_" in name}
        result[case] = {"read": CountingOpen.read, "local": local, "logits": logits, "adapters": adapters,
                        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
        save_sharded(model, Path(out) / case)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
