"""A peft LoRA adapter on the LM head, fused: the losses run over concatenated inputs [h, s·A h] · [W, B]ᵀ
(`hf.LMHead.adapted`), so their values and the gradients of A, B and h equal autograd on the model's materialized
logits in float64, with tied embeddings too, and no N×V tensor is formed."""
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from geffect_kernels import hf, unlearning_loss_from_logprobs
from geffect_kernels.backends import autograd
from geffect_kernels.catalog import IGNORE_INDEX
from geffect_kernels.geffect import GEffectProfiler

from geffect_models import assert_matches_definition, batch, force, materialized, nll, tiny_model

from test_cli import workspace  # noqa: F401  (a fixture)
from test_hf_trainer import demo  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def head_lora(kind="llama", targets=("q_proj", "lm_head"), seed=0, tying=False):
    # init_lora_weights=False: B ≠ 0, so A's gradient is not identically zero and the tests can fail
    config = LoraConfig(r=3, lora_alpha=5, target_modules=list(targets), init_lora_weights=False,
                        ensure_weight_tying=tying)
    torch.manual_seed(seed)
    return get_peft_model(tiny_model(kind, seed=seed), config).double().eval()


def materialized_logprobs(model, b):
    """ℓ_t from the model's own forward (its logits, the adapter applied by peft), HF shift, 0 where ignored."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, lp, 0)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def head_adapter_names(model):
    return sorted(n for n in trainable(model) if "lm_head" in n)


# gemma2: the head tied to a scaled input embedding, soft-capped logits; with peft's ensure_weight_tying the embedding
# carries the head's adapter too
@pytest.mark.parametrize("kind, tying", [("llama", False), ("gemma2", False), ("gemma2", True)])
@pytest.mark.parametrize("backend", ["torch", "oracle"])
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_loss_and_adapter_gradients_equal_the_materialized_logits(kind, tying, backend):
    model = head_lora(kind, tying=tying)
    assert len(head_adapter_names(model)) == 2  # lora_A and lora_B of the head
    forget = batch(seed=3, prompt=2)
    ref = materialized_logprobs(model, forget).detach() + 0.2 * torch.randn(3, 6, dtype=torch.float64)
    params = trainable(model)
    fused = hf.unlearning_loss("npo", model, forget, ref_logprobs=ref, backend=backend)
    fused_grads = torch.autograd.grad(fused, list(params.values()))
    lp = materialized_logprobs(model, forget)
    expected = unlearning_loss_from_logprobs("npo", lp, forget["labels"][:, 1:], ref_logprobs=ref)
    expected_grads = torch.autograd.grad(expected, list(params.values()))
    assert fused.item() == pytest.approx(expected.item(), rel=1e-12)
    for name, a, b in zip(params, fused_grads, expected_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), name
        assert b.abs().max() > 0, name  # every trainable parameter (head adapter, q_proj's) takes a gradient
    assert torch.allclose(hf.token_logprobs(model, forget, backend=backend), lp, rtol=1e-12, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_token_stats_use_the_adapted_head():
    model = head_lora("gemma2")
    b = batch(seed=5)
    stats = hf.token_stats(model, b, backend="torch")
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].detach()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    valid = b["labels"][:, 1:] != IGNORE_INDEX
    assert torch.allclose(stats.entropy, torch.where(valid, entropy, 0), rtol=1e-11, atol=1e-13)
    variance = (logp.exp() * (logp + entropy.unsqueeze(-1)) ** 2).sum(-1)
    assert torch.allclose(stats.logprob_var, torch.where(valid, variance, 0), rtol=1e-10, atol=1e-13)
    assert torch.allclose(stats.logprob, materialized_logprobs(model, b).detach(), rtol=1e-11, atol=1e-13)


def test_disabled_and_merged_adapters_leave_the_base_head():
    model = head_lora()
    b = batch(seed=2)
    with model.disable_adapter():  # what the loop's reference log-probabilities run under
        x = hf.head_inputs(model, b)
        assert x.weight is hf.lm_head(model).weight and x.hidden.shape[-1] == 24
        base = materialized_logprobs(model, b)
        assert torch.allclose(hf.token_logprobs(model, b), base, rtol=1e-12, atol=1e-13)
    adapted = materialized_logprobs(model, b)
    assert not torch.allclose(adapted, base)
    model.base_model.model.lm_head.merge()
    assert hf.head_inputs(model, b).hidden.shape[-1] == 24  # merged: the base weight already holds B A
    assert torch.allclose(hf.token_logprobs(model, b), adapted, rtol=1e-10, atol=1e-12)


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_the_head_inputs_are_concatenated_and_no_logits_are_formed(monkeypatch):
    """[h, s·A h] and [W, B]: r more columns, and no tensor of N×V anywhere in the loss's forward and backward
    (the torch backend holds 5 rows of logits at a time here)."""
    model = head_lora()
    b = batch(batch_size=4, length=9, seed=7)
    x = hf.head_inputs(model, b)
    assert x.hidden.shape == (4, 9, 24 + 3) and x.weight.shape == (61, 24 + 3)
    monkeypatch.setattr(autograd, "CHUNK_BYTES", 4 * 61 * 5)
    n_tokens = 4 * 8
    with Shapes() as watched:
        hf.unlearning_loss("npo", model, b, ref_logprobs=torch.zeros(4, 8, dtype=torch.float64),
                           backend="torch").backward()
    vocab_sized = [s for s in watched.shapes if 61 in s]
    assert vocab_sized and max(math.prod(s) for s in vocab_sized) < n_tokens * 61, sorted(set(vocab_sized))


def test_unsupported_head_adapters_are_one_line_errors():
    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(NotImplementedError, match="variant"):
        hf.token_logprobs(dora, batch())


@pytest.mark.parametrize("form", ["gram", "projection"])
@pytest.mark.parametrize("objective", ["npo", "wga"])  # a per-sample multiple of the NLL's gradient, and not
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_geffects_equal_materialized_with_the_adapters_a_and_b_profiled(kind, objective, form, monkeypatch):
    force(monkeypatch, form)
    model = head_lora(kind, targets=("q_proj", "v_proj", "lm_head"))
    forget, retain = batch(seed=1, prompt=2), batch(batch_size=2, length=9, seed=2, pad_first=False)
    ref = hf.token_logprobs(model, forget).detach() + 0.3 * torch.randn(3, 6, dtype=torch.float64)
    result = GEffectProfiler(model, groups="parameter").measure_unlearning(objective, forget, retain,
                                                                           ref_logprobs=ref)
    names = {n: n for n in trainable(model)}
    assert set(head_adapter_names(model)) <= set(result.by_group)
    loss = lambda m: hf.unlearning_loss(objective, m, forget, ref_logprobs=ref)
    rel = 1e-5 if objective == "npo" else 1e-9  # as tests/test_lora.py: HF's float32 RMSNorm under NPO's shortcut
    for risk, data in (("forget", forget), ("retain", retain)):
        expected = materialized(model, loss, nll(data), names)
        assert set(result.by_group) == set(expected)
        for name, (dot, scale) in expected.items():
            assert result.by_group[name][risk] == pytest.approx(dot, rel=rel, abs=1e-12 * scale), (risk, name)


@pytest.mark.parametrize("form", ["gram", "projection"])
@pytest.mark.parametrize("objective", ["ga", "wga"])
def test_per_sample_geffects_and_the_retain_term_with_a_head_adapter(objective, form, monkeypatch):
    force(monkeypatch, form)
    model = head_lora(targets=("o_proj", "lm_head"), seed=4)
    forget, retain = batch(seed=5, prompt=1), batch(batch_size=2, length=8, seed=6, pad_first=False)
    ref = hf.token_logprobs(model, forget).detach() - 0.2
    result = GEffectProfiler(model, groups="parameter").measure_unlearning(objective, forget, retain,
                                                                           ref_logprobs=ref, per_instance=True)
    assert_matches_definition(model, objective, forget, retain, ref, result)


def test_a_trained_head_weight_beside_its_adapter_is_refused_by_the_profiler():
    model = head_lora()
    hf.lm_head(model).weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="adapter's B alone"):
        GEffectProfiler(model).measure_unlearning("ga", batch(seed=1), batch(seed=2))


@pytest.mark.parametrize("held", [True, False], ids=["head-per-sample", "head-rows"])
def test_instance_guidance_with_a_head_adapter_matches_autograd(held, monkeypatch):
    """`guidance.ForgetGEffects` (per-sample G-effects and the weighted gradient) on `train.lora.add_lora`'s
    adapters with the head among the targets, against autograd on the model's logits."""
    from geffect_kernels.guidance import ForgetGEffects, instance
    from geffect_kernels.train.lora import add_lora
    from test_guidance_instance import per_sample_gradients, retain_gradient

    monkeypatch.setattr(instance, "per_sample_fits", lambda *shape: held)
    model = add_lora(tiny_model("llama"), r=2, targets=["q_proj", "lm_head"]).double()
    with torch.no_grad():  # peft starts lora_B at 0, which would leave lora_A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    forget, retain = batch(batch_size=3, length=7, seed=21, prompt=1), batch(batch_size=2, length=8, seed=22)
    params = trainable(model)
    assert len(head_adapter_names(model)) == 2
    r = retain_gradient(model, retain)
    g = per_sample_gradients(model, forget, "wga")
    want_e = torch.tensor([sum(float((gs[n] * r[n]).sum()) for n in r) for gs in g], dtype=torch.float64)
    step = ForgetGEffects(model, params, forget, "wga")
    torch.testing.assert_close(step.geffects(r), want_e, rtol=1e-9, atol=1e-12 * float(want_e.abs().max()))
    w = torch.tensor([1.4, 0.2, 0.9], dtype=torch.float64)
    got = step.weighted_gradient(w)
    for n in params:
        want = sum(ws * gs[n] for ws, gs in zip(w.tolist(), g))
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12 * (float(want.abs().max()) + 1e-30), msg=n)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_geffect_train_lora_on_the_head_trains_profiles_and_saves_its_adapter(capsys, workspace, tmp_path):
    """`geffect train --lora-targets ...,lm_head`: the loop's fused losses, its reference (adapters disabled) and
    its G-effects take the head's adapter; the saved adapter holds it and `profile` reads it back."""
    import json

    from safetensors.torch import load_file
    from test_cli import run

    m, f, r = workspace / "model", workspace / "forget.json", workspace / "retain.json"
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", m, "--forget", f, "--retain", r, "--objective", "npo",
                       "--steps", 2, "--lr", 0.01, "--batch-size", 4, "--geffect-every", 1, "--lora-r", 2,
                       "--lora-targets", "v_proj,lm_head", "--out", out, "--no-progress")
    assert code == 0, err
    saved = out / "runs" / "npo" / "model"
    tensors = load_file(saved / "adapter_model.safetensors")
    assert any("lm_head.lora_B" in k for k in tensors) and any("lm_head.lora_A" in k for k in tensors)
    geffects = json.loads((out / "runs" / "npo" / "geffects.json").read_text())["records"]
    assert "head" in geffects[0]["by_group"] and all(math.isfinite(v) for v in geffects[0]["by_group"]["head"].values())
    code, _, err = run(capsys, "profile", "--model", saved, "--forget", f, "--retain", r, "--objective", "ga",
                       "--samples", 4, "--groups", "component", "--out", tmp_path / "prof")
    assert code == 0, err
    rows = (tmp_path / "prof" / "profile.csv").read_text().splitlines()
    assert any(row.startswith("ga,head,retain,") for row in rows), sorted({r.split(",")[1] for r in rows})


def test_the_gpu_suites_head_adapter_row_runs_on_the_cpu():
    """benchmarks/head_adapter_case.py (the GPU suite's head-adapter row) at tiny sizes: its own float64 check."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from head_adapter_case import head_adapter_row

    errors, step = head_adapter_row(torch.device("cpu"), n=37, h=16, v=53, r=3, dtype=torch.float64, backend="torch")
    assert max(errors.values()) < 1e-10, errors
    errors, step = head_adapter_row(torch.device("cpu"), n=37, h=16, v=53, r=3, dtype=torch.float32, backend="torch")
    assert max(errors.values()) < 1e-4, errors
    loss, grads = step()
    assert [tuple(g.shape) for g in grads] == [(3, 16), (53, 3), (37, 16)]


def test_a_head_adapter_in_a_sharded_run_is_one_line_before_anything_is_written(capsys, workspace, tmp_path):
    from test_cli import run

    m, f, r = workspace / "model", workspace / "forget.json", workspace / "retain.json"
    code, _, err = run(capsys, "train", "--model", m, "--forget", f, "--retain", r, "--lora-r", 2, "--lora-targets",
                       "q_proj,lm_head", "--nproc", 2, "--out", tmp_path / "run", "--no-progress")
    assert code == 1 and err.count("\n") == 1 and "lm_head runs in one process only" in err, err
    assert not (tmp_path / "run").exists()


def test_the_unlearning_trainer_trains_a_head_adapter(demo, tmp_path):
    """`hf.UnlearningTrainer` on a PEFT model whose head carries an adapter: the reference is the model without its
    adapters (the plain model's log-probabilities), G-effects are measured, and the head's adapter moves."""
    from test_hf_trainer import arguments, model_of, trainer_of

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(model_of(demo[2]), config)
    head_b = [p for n, p in model.named_parameters() if "lm_head.lora_B" in n]
    before = [p.detach().clone() for p in head_b]
    trainer = trainer_of(demo, tmp_path, model, objective="npo", retain_objective="kl", geffect_every=1,
                         args=arguments(tmp_path, max_steps=1))
    trainer.train()
    batch_ = demo[3].batch(range(len(demo[3])))
    expected = hf.token_logprobs(model_of(demo[2]), batch_)
    for i, row in enumerate(trainer.reference.rows):
        torch.testing.assert_close(row.double(), expected[i, : len(row)].float().double(), rtol=0, atol=1e-6)
    assert trainer.geffects.steps == [0] and all(math.isfinite(v) for v in trainer.geffects.per_step("retain"))
    assert len(head_b) == 1 and not torch.equal(before[0], head_b[0])
