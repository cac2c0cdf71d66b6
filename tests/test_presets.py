"""`preset="official"`: the official G-effect scripts' settings (docs/conventions.md), what a user gives wins,
the data- and model-dependent ones resolved at training time, and the official KL normalization."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from geffect_kernels.data import encode_pairs
from geffect_kernels.train import TrainConfig, tiny_llama, train
from geffect_kernels.train.losses import kl_retain_loss
from geffect_kernels.train.presets import resolve
from demo_cases import tiny_demo


pytestmark = pytest.mark.usefixtures("one_thread")


def test_official_preset_fills_the_defaults_and_leaves_given_values():
    c = TrainConfig(objective="npo", preset="official")
    assert c.hparams == {"beta": 0.5}
    assert (c.batch_size, c.grad_accum, c.checkpoint_every, c.seed, c.weight_decay) == (4, 4, 5, 42, 0.0)
    assert c.max_grad_norm is None and c.retain_objective == "kl" and c.kl_normalization == "batchmean"
    assert TrainConfig(objective="wga", preset="official").hparams == {"alpha": 5.0}
    assert TrainConfig(objective="tnpo", preset="official").hparams == {"beta": 4.0, "eps": 1e-5}
    assert TrainConfig(objective="wtnpo", preset="official").hparams == {"alpha": 1.5, "beta": 4.0, "eps": 1e-5}
    given = TrainConfig(objective="npo", preset="official", batch_size=2, hparams={"beta": 0.2},
                        retain_objective="none")
    assert (given.batch_size, given.hparams, given.retain_objective) == (2, {"beta": 0.2}, "none")
    assert TrainConfig(objective="npo").hparams == {} and TrainConfig().kl_normalization == "tokens"


def test_a_setting_given_equal_to_the_default_still_wins_over_the_preset():
    given = TrainConfig(objective="npo", preset="official", batch_size=8, seed=0, max_grad_norm=1.0,
                        retain_objective="nll", hparams={"beta": 0.1})
    assert (given.batch_size, given.seed, given.max_grad_norm, given.retain_objective) == (8, 0, 1.0, "nll")
    assert given.hparams == {"beta": 0.1} and given.grad_accum == 4  # what was not given is the preset's
    positional = TrainConfig("npo", {}, "nll", preset="official")  # positional arguments count as given
    assert positional.retain_objective == "nll" and positional.batch_size == 4
    loaded = TrainConfig.from_dict({"objective": "npo", "preset": "official", "batch_size": 8})  # YAML / CLI
    assert (loaded.batch_size, loaded.grad_accum) == (8, 4)


def test_unknown_preset_and_normalization_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^unknown preset 'paper'; valid: official$"):
        TrainConfig(preset="paper")
    with pytest.raises(ValueError, match=r"^unknown kl_normalization 'sum'; valid: tokens, batchmean$"):
        TrainConfig(kl_normalization="sum")


def test_preset_resolves_epochs_warmup_and_the_learning_rate_of_the_model_family():
    def model(family):
        return SimpleNamespace(config=SimpleNamespace(model_type=family))

    c = TrainConfig(objective="npo", preset="official")
    llama = resolve(c, model("llama"), n_forget=200)  # TOFU forget05: 200 samples
    assert (llama.steps, llama.warmup_steps, llama.lr) == (62, 12, 1e-5)  # 5·200 // 16 = 62, as basher2.py's cap
    assert resolve(c, model("phi"), n_forget=400).steps == 125 and resolve(c, model("phi"), 400).lr == 2e-5
    assert resolve(c, model("gpt2"), n_forget=40).lr == c.lr  # a family the official scripts never ran
    assert resolve(TrainConfig(preset="official", steps=7, lr=3e-4), model("phi"), 40).steps == 7
    assert resolve(TrainConfig(preset="official", lr=3e-4), model("phi"), 40).lr == 3e-4
    at_defaults = resolve(TrainConfig(preset="official", steps=30, warmup_steps=0, lr=1e-5), model("phi"), 400)
    assert (at_defaults.steps, at_defaults.warmup_steps, at_defaults.lr) == (30, 0, 1e-5)
    plain = TrainConfig()
    assert resolve(plain, model("phi"), 40) is plain


@pytest.fixture(scope="module")
def tiny():
    data, tokenizer = tiny_demo()
    return data, tokenizer


def test_batchmean_kl_is_the_official_kl_div_over_every_position(tiny):
    data, tokenizer = tiny
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0).double()
    reference = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=1).double()
    batch = encode_pairs(tokenizer, data.retain[:3]).batch([0, 1, 2])  # padded: lengths differ
    assert (batch["attention_mask"] == 0).any()
    got = kl_retain_loss(model, reference, batch, normalization="batchmean", backend="torch")
    # dataloader.py: kl_div(log p_θ, log p_ref, reduction="batchmean", log_target=True) on the [B·T, V] rows
    current = F.log_softmax(model(**batch).logits, -1).flatten(0, 1)
    with torch.no_grad():
        ref = F.log_softmax(reference(**batch).logits, -1).flatten(0, 1)
    expected = F.kl_div(current, ref, reduction="batchmean", log_target=True)
    assert torch.allclose(got.double(), expected, rtol=1e-9, atol=1e-12)
    tokens = kl_retain_loss(model, reference, batch, normalization=TrainConfig().kl_normalization, backend="torch")
    assert not torch.allclose(tokens.double(), expected, rtol=1e-3)  # the default is another normalization


def test_training_with_the_official_preset_records_the_resolved_settings(tiny, tmp_path):
    data, tokenizer = tiny
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0)
    forget, retain = encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain)
    result = train(model, forget, retain, TrainConfig(objective="npo", preset="official", out_dir=str(tmp_path),
                                                      progress=False))
    saved = json.loads((tmp_path / "config.json").read_text())
    n = len(forget)
    assert saved["steps"] == max(1, 5 * n // 16) == result.steps and saved["lr"] == 1e-5  # tiny_llama: llama
    assert saved["hparams"] == {"beta": 0.5} and saved["retain_objective"] == "kl" and saved["preset"] == "official"
