"""Peak memory of a training run beside the memory plan's figure (``extra_info``: ``peak_mib``, ``plan_mib``,
``plan_vs_measured``, ``every_lora_b_moved``); the time is the whole run's, for scale only.

- CPU: `train` on a random-weight Llama in a fresh process, glibc's mmap threshold fixed, the peak resident memory
  above the process before the model was built (`train_memory.py`'s worker; that tool also sweeps the plan check and
  measures other checkouts); a tiny run measures in this process;
- GPU (``gpu``): one LoRA NPO step with gradient checkpointing on the 6.7B shape (bf16 weights, r 8 on q and v),
  the allocator's peak over the whole run, weights included.

    python -m pytest benchmarks/test_train_memory.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import bench
import train_memory
from large_shapes import SEQS, SHAPES, build

TINY_SHAPE = (2, 64, 128, 4, 512)  # layers, hidden, intermediate, heads, vocabulary
CPU_CASES = [  # name, LoRA rank, objective, retain objective: one line per case
    ("LoRA, GA", 8, "ga", "nll"),
    ("full, GA", None, "ga", "nll"),
]


@pytest.mark.parametrize("name,lora_r,objective,retain", CPU_CASES, ids=[f"cpu-{c[0]}" for c in CPU_CASES])
def test_train_peak_memory_cpu(benchmark, name, lora_r, objective, retain):
    case = {"name": name, "shape": TINY_SHAPE if bench.TINY else train_memory.ISSUE_SHAPE, "batch": 2 if bench.TINY
            else 4, "tokens": 8 if bench.TINY else 64, "lora_r": lora_r, "objective": objective, "retain": retain,
            "steps": 1 if bench.TINY else 2}
    found = {}
    measure = train_memory.worker if bench.TINY else train_memory.run_case  # tiny: in this process, no start-up
    bench.timed(benchmark, lambda: found.update(measure(case)), torch.device("cpu"), rounds=1,
                group="train peak memory cpu", case=name)
    plan = train_memory.planned_mib(case)
    ratio = round(plan / found["peak_mib"], 3) if found["peak_mib"] > 0 else None  # in-process: the heap may be grown
    benchmark.extra_info.update(found, plan_mib=plan, plan_vs_measured=ratio,
                                shape="x".join(map(str, case["shape"])), sequences=case["batch"], tokens=case["tokens"])
    assert found["peak_mib"] >= 0 and found["every_lora_b_moved"] in (None, True)


def planned_mib(shape, tokens, device) -> float:
    from geffect_kernels.train.memory_plan import ModelShape, PlanSettings, plan
    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    settings = PlanSettings(objective="npo", retain_objective="nll", batch_size=SEQS, seq_len=tokens, n_forget=SEQS,
                            dtype="bfloat16", lora_r=8, gradient_checkpointing=True, device=device.type)
    return plan(ModelShape(layers, hidden, inter, heads, kv, hidden // heads, vocab, False), settings).peak / 2**20


@pytest.mark.gpu
def test_lora_checkpointed_step_peak_memory_gpu(benchmark):
    from geffect_kernels.data.prompts import EncodedSet
    from geffect_kernels.train import TrainConfig, train
    from geffect_kernels.train.lora import add_lora

    dev = bench.device("gpu")
    shape, tokens = ("tiny", 16) if bench.TINY else ("6.7b", 512)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPES[shape][-1], (2, SEQS, tokens), generator=g).tolist()
    forget, retain = (EncodedSet([{"input_ids": row, "labels": row} for row in side], 0) for side in ids)
    config = TrainConfig(objective="npo", retain_objective="nll", steps=1, batch_size=SEQS, lr=1e-4,
                         gradient_checkpointing=True, progress=False, checkpoint_every=1000)
    models = []

    def run():
        models[:] = [add_lora(build(shape, torch.bfloat16, dev), r=8, targets=["q_proj", "v_proj"])]
        train(models[0], forget, retain, config)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        bench.timed(benchmark, run, dev, rounds=1, group=f"train peak memory {shape} gpu", case="LoRA NPO ckpt")
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = bench.resident_peak_mib(lambda: bench.timed(benchmark, run, dev, rounds=1, case="LoRA NPO ckpt",
                                                           group=f"train peak memory {shape} gpu"))
    plan = planned_mib(shape, tokens, dev)
    moved = all(bool((p.detach() != 0).any()) for n, p in models[0].named_parameters() if "lora_B" in n)
    benchmark.extra_info.update(peak_mib=round(peak, 1), plan_mib=round(plan, 1), every_lora_b_moved=moved,
                                plan_vs_measured=round(plan / peak, 3) if peak > 0 else None, tokens=tokens)
    assert moved
