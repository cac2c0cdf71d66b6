"""Half-precision weights in training: LoRA adapters stay float32 over a bf16 base that does not move, full
fine-tuning of a bf16 model updates float32 master weights, and `geffect train --dtype`."""
import pytest
import torch

from geffect_kernels.train import TrainConfig, tiny_llama, train
from geffect_kernels.train.lora import add_lora
from geffect_kernels.train.precision import compute_autocast, float32_masters
from demo_cases import encoded_sets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return encoded_sets()


def bf16_model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=48, seed=3).to(torch.bfloat16)


def config(**kw):
    return TrainConfig(**{"objective": "npo", "steps": 2, "batch_size": 3, "lr": 1e-3, "progress": False, **kw})


def test_lora_adapters_train_in_float32_over_a_bf16_base(setup):
    tokenizer, forget, retain = setup
    model = add_lora(bf16_model(tokenizer), r=2, targets=["q_proj", "v_proj"])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, forget, retain, config())
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
            assert "lora_A" in name or bool((p != 0).any()), name  # every lora_B moved from zero
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, base[name]), name


def test_full_fine_tuning_of_a_bf16_model_updates_float32_masters(setup):
    tokenizer, forget, retain = setup
    model = bf16_model(tokenizer)
    start = {n: p.detach().float() for n, p in model.named_parameters()}
    # a learning rate whose updates are far below a bf16 weight's spacing: they survive only in float32
    train(model, forget, retain, config(objective="ga", lr=1e-6, steps=1, max_grad_norm=None))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(moved) == len(start)
    assert all(not torch.equal(p.to(torch.bfloat16).float(), p) for n, p in model.named_parameters())


def test_float32_masters_and_the_autocast_they_imply():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.float16)
    model[0].requires_grad_(False)
    assert float32_masters(model) == torch.float16
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32
    assert float32_masters(torch.nn.Linear(2, 2).double()) is None
    cpu = compute_autocast(torch.device("cpu"), torch.bfloat16)
    assert cpu.fast_dtype == torch.bfloat16 and cpu._enabled
    assert not compute_autocast(torch.device("cpu"), None)._enabled


def test_cli_dtype(tmp_path, capsys):
    from geffect_kernels.cli import main
    from test_cli import make_workspace

    w = make_workspace(tmp_path)
    common = ["train", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
              "--steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    assert main([str(a) for a in common + ["--dtype", "bfloat16", "--lora-r", "2", "--out", tmp_path / "o"]]) == 0
    assert "final loss" in capsys.readouterr().out
    assert main([str(a) for a in common + ["--dtype", "bfloat16", "--nproc", "2", "--out", tmp_path / "p"]]) == 1
    assert "--dtype bfloat16 is for one process" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_fine_tuning_of_a_half_model_with_a_kl_retain_term(setup, dtype):
    # the frozen reference keeps the loaded dtype while the trained weights become float32 masters: the KL term
    # compares the two heads in the trained one's dtype
    tokenizer, forget, retain = setup
    model = bf16_model(tokenizer).to(dtype)
    result = train(model, forget, retain, config(objective="ga", retain_objective="kl", steps=2))
    assert all(torch.isfinite(torch.tensor(m["retain_loss"])) for m in result.metrics)
    assert result.metrics[0]["retain_loss"] == pytest.approx(0.0, abs=1e-6)  # step 1 starts at the reference
    assert result.metrics[1]["retain_loss"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_dtype_with_a_kl_retain_term(tmp_path, capsys, dtype):
    from geffect_kernels.cli import main
    from test_cli import make_workspace

    w = make_workspace(tmp_path)
    argv = ["train", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
            "--steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu", "--dtype", dtype,
            "--retain-objective", "kl", "--out", tmp_path / "o"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert "final loss" in capsys.readouterr().out
