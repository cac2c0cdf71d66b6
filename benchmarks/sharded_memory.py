"""Per-rank memory of the sharded G-effect profiler for Llama-2 7B/13B/70B on 8 GPUs, from the formula in
geffect_kernels/geffect/sharded.py, and of loading and saving those models straight into and out of shards, from
the formula in geffect_kernels/train/hf_shards.py (computed, not measured): `python benchmarks/sharded_memory.py`."""
from geffect_kernels.geffect.sharded import memory_per_rank
from geffect_kernels.train.hf_shards import peak_bytes

# (name, layers, hidden, intermediate, kv width, vocabulary) of the Llama-2 family
SHAPES = [("7B", 32, 4096, 11008, 4096, 32000), ("13B", 40, 5120, 13824, 5120, 32000),
          ("70B", 80, 8192, 28672, 1024, 32000)]
WORLD = 8


def counts(layers, hidden, intermediate, kv, vocab):
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    root = 2 * vocab * hidden + hidden  # embedding, head (untied), final norm
    return layers * block + root, block, root


def main():
    print(f"| model | parameters | per rank at {WORLD} GPUs: full fine-tuning | LoRA r=8 on q,v | "
          "training state (AdamW, for comparison) |")
    print("|---|---|---|---|---|")
    gib = 2 ** 30
    for name, layers, hidden, inter, kv, vocab in SHAPES:
        total, block, root = counts(layers, hidden, inter, kv, vocab)
        lora = layers * 8 * (2 * hidden + hidden + kv)  # A (r×H) and B (out×r) on q_proj and v_proj
        full = memory_per_rank(total, block, root, WORLD)
        adapters = memory_per_rank(total, block, root, WORLD, trainable=lora)
        adam = 16 * total / WORLD  # float32 shards of the parameters, gradients, two moments
        print(f"| {name} | {total / 1e9:.2f} B | {full / gib:.1f} GiB | {adapters / gib:.1f} GiB | "
              f"{adam / gib:.1f} GiB |")
    print(f"\n| model | float32 weights (loaded whole, or gathered whole) | per rank at {WORLD} GPUs: sharded load "
          "| sharded save (rank 0) |")
    print("|---|---|---|---|")
    for name, layers, hidden, inter, kv, vocab in SHAPES:
        total, block, root = counts(layers, hidden, inter, kv, vocab)
        peaks = peak_bytes(total, block, root, max(vocab, inter) * hidden, WORLD)
        print(f"| {name} | {4 * total / gib:.1f} GiB | {peaks['load'] / gib:.1f} GiB | {peaks['save'] / gib:.1f} GiB |")


if __name__ == "__main__":
    main()
