"""The memory plan's table for docs/large_models.md: Llama-2 7B and 13B and Llama-3 8B on 24, 40 and 80 GB cards.

    python benchmarks/memory_plan_table.py          # prints the Markdown table

Configs are the published ones (sizes only; nothing downloaded). A card fits a run when the plan's peak is at most
its memory less `RESERVED_GIB` (the CUDA context and the allocator's slack).
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from geffect_kernels.train.memory_plan import GIB, ModelShape, PlanSettings, plan  # noqa: E402

MODELS = {
    "Llama-2 7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "Llama-3 8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "Llama-2 13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
}
CARDS_GIB = (24, 40, 80)
RESERVED_GIB = 1.0
BATCH, TOKENS = 4, 512  # sequences per side and tokens per sequence
RUNS = {  # label: settings (bf16 weights, NPO with an NLL retain term unless said)
    "LoRA r 8 (q, v)": dict(lora_r=8),
    "LoRA r 8 (q, v), checkpointing": dict(lora_r=8, gradient_checkpointing=True),
    "LoRA r 8 (q, v), checkpointing, KL retain": dict(lora_r=8, gradient_checkpointing=True, retain_objective="kl"),
    "full, checkpointing": dict(gradient_checkpointing=True),
    "full, checkpointing, KL retain on the CPU": dict(gradient_checkpointing=True, retain_objective="kl",
                                                      reference_device="cpu"),
}


def table() -> str:
    lines = [f"| model | run | peak, 1 GPU (GiB) | {' | '.join(f'{c} GB' for c in CARDS_GIB)} | "
             f"FSDP2 ranks of 80 GB |",
             "|---|---|---:|" + ":---:|" * len(CARDS_GIB) + "---:|"]
    for model, config in MODELS.items():
        shape = ModelShape.from_config(config)
        for label, settings in RUNS.items():
            base = dict(objective="npo", retain_objective="nll", batch_size=BATCH, seq_len=TOKENS, n_forget=400,
                        dtype="bfloat16")
            one = plan(shape, PlanSettings(**{**base, **settings})).peak / GIB
            fits = ["yes" if one <= card - RESERVED_GIB else "no" for card in CARDS_GIB]
            ranks = next((r for r in (2, 4, 8, 16) if plan(shape, PlanSettings(
                **{**base, **settings, "world": r, "dtype": "float32", "reference_device": None})).peak / GIB
                <= CARDS_GIB[-1] - RESERVED_GIB), "> 16")
            lines.append(f"| {model} | {label} | {one:.1f} | {' | '.join(fits)} | "
                         f"{1 if fits[-1] == 'yes' else ranks} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
