"""The memory plan's arithmetic on small configs: parameter and adapter counts against real models, each term
against its formula written out here, the moments of a step, and `geffect train --plan`."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from geffect_kernels.train.lora import add_lora
from geffect_kernels.train.memory_plan import ModelShape, PlanSettings, format_plan, plan

CONFIGS = {
    "gqa untied": dict(vocab_size=301, hidden_size=48, intermediate_size=83, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
    "head_dim tied": dict(vocab_size=257, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=12, tie_word_embeddings=True),
}


def meta_model(values):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**values))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_and_adapters_counted_as_the_model_has_them(name):
    model = meta_model(CONFIGS[name])
    shape = ModelShape.from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied: the shared matrix once
    assert ModelShape.from_config(CONFIGS[name]) == shape
    for targets in (["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"]):
        lora = add_lora(LlamaForCausalLM(LlamaConfig(**CONFIGS[name])), r=3, targets=targets)
        assert shape.lora_params(3, targets) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def shape_of(name="gqa untied"):
    return ModelShape.from_config(CONFIGS[name])


def test_terms_follow_their_formulas():
    s = shape_of()
    P, V, H, L, I = s.params, 301, 48, 3, 83
    q, kv = 6 * 8, 2 * 8
    A = L * 5 * ((H + q) + (H + kv))  # r 5 on q_proj (H -> q) and v_proj (H -> kv)
    lora = plan(s, PlanSettings(objective="npo", retain_objective="kl", dtype="bfloat16", lora_r=5, n_forget=7,
                                seq_len=11, batch_size=3))
    assert lora.terms["weights"] == 2 * P + 4 * A  # frozen bf16 base, float32 adapters
    assert lora.terms["adamw state"] == 8 * A and lora.terms["gradients"] == 4 * A
    assert "reference copy" not in lora.terms and "reference copy" not in lora.host  # adapters disabled instead
    assert lora.host == {"reference log-probabilities": 4 * 7 * 11}

    full = plan(s, PlanSettings(objective="ga", retain_objective="kl", dtype="bfloat16"))
    assert full.terms["weights"] == 4 * P and full.terms["gradients"] == 4 * P  # float32 masters
    assert full.terms["adamw state"] == 8 * P and full.terms["reference copy"] == 2 * P  # reference as loaded
    assert full.terms["autocast copies"] == 2 * (P - V * H)  # every matrix but the embedding, in bf16
    assert full.phases["optimizer step"] == 4 * P + 8 * P + 2 * P + 4 * P + 4 * P  # + multi-tensor temporary
    on_cpu = plan(s, PlanSettings(objective="ga", retain_objective="kl", reference_device="cpu"))
    assert on_cpu.host["reference copy"] == 4 * P and "reference copy" not in on_cpu.terms
    assert full.peak == max(full.phases.values())

    sharded = plan(s, PlanSettings(objective="ga", retain_objective="nll", world=4, batch_size=8))
    one = plan(s, PlanSettings(objective="ga", retain_objective="nll", batch_size=2))
    assert sharded.terms["weights"] == 4 * P // 4 and sharded.terms["adamw state"] == 8 * P // 4
    block = q * H + 2 * kv * H + q * H + 3 * H * I + 2 * H
    assert sharded.terms["gathered blocks"] == 2 * (2 * block + (2 * V * H + H))
    assert sharded.terms["activations"] == one.terms["activations"]  # each rank runs 8 / 4 samples


def test_activations_are_the_saved_tensors_of_each_layer():
    s = shape_of()
    H, L, I, q, kv = 48, 3, 83, 48, 16
    tokens, sides = 2 * 13, 2
    full = plan(s, PlanSettings(device="cpu", batch_size=2, seq_len=13))
    # per token and layer, float32: norm inputs and outputs, q k v and attention output, o_proj's input,
    # gate, up, SiLU output, their product; then the final norm's input and output and the head's input
    saved = [H, H, q, kv, kv, q, q, H, H, I, I, I, I]
    assert full.terms["activations"] == 4 * sides * tokens * (L * sum(saved) + 3 * H)
    ckpt = plan(s, PlanSettings(device="cpu", batch_size=2, seq_len=13, gradient_checkpointing=True))
    assert ckpt.terms["activations"] == 4 * (sides * tokens * L * H + tokens * sum(saved) + sides * tokens * 3 * H)
    # LoRA on q and v: a frozen linear keeps no input; the adapters keep theirs (the norm's output) and the middle
    lora = plan(s, PlanSettings(device="cpu", batch_size=2, seq_len=13, lora_r=8))
    saved_lora = [H, H, q, kv, kv, q, H, I, I, I, 8, 8]
    assert lora.terms["activations"] == 4 * sides * tokens * (L * sum(saved_lora) + 3 * H)


def test_checkpointing_lowers_the_peak_and_longer_batches_raise_it():
    s = ModelShape.from_config(dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                    num_attention_heads=16))
    at = {(ckpt, tokens): plan(s, PlanSettings(lora_r=8, batch_size=4, seq_len=tokens, gradient_checkpointing=ckpt,
                                               device="cpu")).peak for ckpt in (False, True) for tokens in (64, 256)}
    assert at[True, 256] < at[False, 256] and at[False, 64] < at[False, 256]


def test_table_and_bad_settings():
    table = format_plan({"1 device": plan(shape_of(), PlanSettings()), "4 ranks": plan(shape_of(),
                                                                                       PlanSettings(world=4))})
    assert "peak per device" in table and "4 ranks" in table and "gathered blocks" in table
    assert table.endswith("(MiB)")  # a small model's figures in MiB
    peak = plan(shape_of(), PlanSettings()).peak
    assert f"{peak / 2**20:.2f}" in next(line for line in table.splitlines() if line.startswith("peak per device"))
    with pytest.raises(ValueError, match="not linear layers"):
        plan(shape_of(), PlanSettings(lora_r=2, lora_targets=("c_attn",)))
    with pytest.raises(ValueError, match="unknown dtype"):
        PlanSettings(dtype="int8")
    with pytest.raises(ValueError, match="Llama-style decoder config"):
        ModelShape.from_config({"n_embd": 64})


def test_cli_plan_prints_the_table_and_trains_nothing(tmp_path, capsys):
    from geffect_kernels.cli import main
    from test_cli import make_workspace

    w = make_workspace(tmp_path)
    argv = ["train", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
            "--objective", "npo", "ga", "--lora-r", "4", "--dtype", "bfloat16", "--gradient-checkpointing",
            "--plan", "--nproc", "2", "--out", tmp_path / "out", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert out.count("peak per device") == 2 and "2 ranks" in out and "memory plan of npo" in out
    assert "on the host: reference log-probabilities" in out
    assert not (tmp_path / "out").exists()
    assert main([str(a) for a in argv + ["--lora-targets", "c_attn"]]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
