"""Llama shapes for the model-level benchmarks, built from configs with random weights (nothing downloaded).

``1.1b``, ``6.7b``, ``13b``: the GPU shapes; ``L4-H256``, ``L4-H512``: the CPU shapes; ``tiny``: the smoke shape of
the same code (CI), never a result to quote.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocabulary
    "1.1b": (22, 2048, 5632, 32, 4, 32000),
    "6.7b": (32, 4096, 11008, 32, 32, 32000),
    "13b": (40, 5120, 13824, 40, 40, 32000),
    "L4-H256": (4, 256, 688, 4, 4, 32000),
    "L4-H512": (4, 512, 1376, 4, 4, 32000),
    "tiny": (2, 64, 128, 4, 2, 512),
}
SEQS = 4  # sequences per side of every batch


def build(shape, dtype, device, layers=None, seed=0):
    """The model of ``shape`` made directly in ``dtype`` on ``device`` (13B in float32 would not fit twice)."""
    n_layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers or n_layers)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def token_batches(shape, tokens, device, seed=1):
    """(forget, retain): two batches of `SEQS` random sequences of ``tokens`` tokens."""
    vocab = SHAPES[shape][-1]
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, vocab, (2, SEQS, tokens), device=device, generator=g)
    return {"input_ids": ids[0]}, {"input_ids": ids[1]}


def timed(fn, repeats, device):
    """(median ms over ``repeats`` after one warm-up, peak MiB allocated on a CUDA ``device`` or nan)."""
    import statistics
    import time

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    return statistics.median(times), peak
