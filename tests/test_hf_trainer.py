"""`UnlearningTrainer` (a `transformers.Trainer`): its step's loss and gradient against the formulas written out on the
model's logits in float64, every catalog objective and retain term, gradient accumulation, checkpoints and resume,
G-effects through TensorBoard's event files, stop rules, LoRA's reference and the errors that name an argument."""
import math

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from geffect_kernels import hf
from geffect_kernels.catalog import OBJECTIVES, RETAIN_TERMS
from geffect_kernels.data import encode_pairs
from geffect_kernels.hf_trainer import ForgetRetainPairs, retain_index
from geffect_kernels.train import tiny_llama
from demo_cases import tiny_demo
import formulas

pytestmark = pytest.mark.usefixtures("one_thread")

HPARAMS = {"npo": {"beta": 0.7}, "tnpo": {"beta": 2.0}, "wtnpo": {"alpha": 0.5, "beta": 2.0},
           "simnpo": {"beta": 1.5, "delta": 0.3}, "wga": {"alpha": 0.8}, "satimp": {"alpha": 2.0, "gamma": 1.5}}


@pytest.fixture(scope="module")
def demo():
    data, tokenizer = tiny_demo()
    return ([p.to_record() for p in data.forget], [p.to_record() for p in data.retain], tokenizer,
            encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain))


def model_of(tokenizer, seed=0, dtype=torch.float64):
    return tiny_llama(tokenizer, hidden_size=24, layers=2, heads=2, intermediate_size=40, seed=seed).to(dtype)


def arguments(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                    seed=3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    warmup_steps=0)
    return TrainingArguments(**{**settings, **overrides})


def trainer_of(demo, tmp_path, model=None, args=None, **kwargs):
    forget, retain, tokenizer, _, _ = demo
    model = model if model is not None else model_of(tokenizer)
    settings = dict(forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
    return hf.UnlearningTrainer(model=model, args=args or arguments(tmp_path), **{**settings, **kwargs})


def token_logprobs_by_logits(model, batch):
    """ℓ_t from the model's own logits: ``[B, T-1]`` (HF shift) and the valid mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, 0), valid


def test_first_step_loss_and_update_match_the_formulas(demo, tmp_path):
    """One SGD step (lr 0.5, no clipping) over the whole forget set: the logged loss is NPO on the forget examples
    plus retain_weight times the NLL of the retain examples paired with them, and the update is −lr times that
    loss's gradient, each computed here from the model's logits in float64."""
    forget, retain, tokenizer, forget_set, retain_set = demo
    start = model_of(tokenizer)
    model = model_of(tokenizer)
    args = arguments(tmp_path, max_steps=1, per_device_train_batch_size=len(forget), optim="sgd", learning_rate=0.5,
                     max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant")
    trainer = trainer_of(demo, tmp_path, model, args, objective="npo", hparams={"beta": 0.7}, retain_weight=0.6,
                         forget_weight=1.3)
    trainer.train()
    pairs = [retain_index(3, 0, i, len(retain)) for i in range(len(forget))]
    f_batch = forget_set.batch(range(len(forget)))
    r_batch = retain_set.batch(pairs)
    with torch.no_grad():
        ref, _ = token_logprobs_by_logits(start, f_batch)
        ref = ref.float().double()  # the trainer keeps them in float32
    lp, valid = token_logprobs_by_logits(start, f_batch)
    loss = 1.3 * formulas.objective("npo", lp, valid, ref, beta=0.7)
    lp_r, valid_r = token_logprobs_by_logits(start, r_batch)
    loss = loss + 0.6 * formulas.objective("nll", lp_r, valid_r)
    loss.backward()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    moved = dict(model.named_parameters())
    for name, p in start.named_parameters():
        torch.testing.assert_close(moved[name].detach(), p.detach() - 0.5 * p.grad, rtol=1e-9, atol=1e-11)


def test_rectify_guidance_step_matches_the_formula(demo, tmp_path):
    """guidance="rectify": one SGD step is −lr (g' + r), with g the objective term's gradient, r the retain term's
    and, in each layer where ⟨g, r⟩ < 0, g' = g − (⟨g, r⟩/‖r‖²) r, all from the model's logits in float64."""
    from geffect_kernels.guidance.step import layer_grouping

    forget, retain, tokenizer, forget_set, retain_set = demo
    start = model_of(tokenizer)
    model = model_of(tokenizer)
    args = arguments(tmp_path, max_steps=1, per_device_train_batch_size=len(forget), optim="sgd", learning_rate=0.5,
                     max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant")
    trainer = trainer_of(demo, tmp_path, model, args, objective="ga", guidance="rectify", retain_weight=0.7)
    trainer.train()
    f_batch = forget_set.batch(range(len(forget)))
    r_batch = retain_set.batch([retain_index(3, 0, i, len(retain)) for i in range(len(forget))])
    params = dict(start.named_parameters())
    lp, valid = token_logprobs_by_logits(start, f_batch)
    g = dict(zip(params, torch.autograd.grad(formulas.objective("ga", lp, valid), list(params.values()))))
    lp_r, valid_r = token_logprobs_by_logits(start, r_batch)
    r = dict(zip(params, torch.autograd.grad(0.7 * formulas.objective("nll", lp_r, valid_r), list(params.values()))))
    group = layer_grouping(start)
    conflicts = 0
    for layer in set(group.values()):
        names = [n for n in params if group[n] == layer]
        dot = sum(float((g[n] * r[n]).sum()) for n in names)
        norm = sum(float((r[n] * r[n]).sum()) for n in names)
        if dot < 0 < norm:
            conflicts += 1
            for n in names:
                g[n] = g[n] - dot / norm * r[n]
    assert conflicts > 0  # the case rectify exists for occurs here
    assert [rec["rectified_groups"] for rec in trainer.state.log_history if "loss" in rec] == [conflicts]
    moved = dict(model.named_parameters())
    for name, p in params.items():
        torch.testing.assert_close(moved[name].detach(), p.detach() - 0.5 * (g[name] + r[name]), rtol=1e-9,
                                   atol=1e-12)


def test_instance_guidance_step_matches_the_formula(demo, tmp_path):
    """guidance="instance": one SGD step is −lr (r + Σ_s w_s g_s), g_s forget sample s's part of the objective's
    gradient, r the retain term's, w = B·softmax(z/τ) with z the standardized e_s = ⟨g_s, r⟩, from the model's logits
    in float64."""
    forget, retain, tokenizer, forget_set, retain_set = demo
    start = model_of(tokenizer)
    model = model_of(tokenizer)
    args = arguments(tmp_path, max_steps=1, per_device_train_batch_size=len(forget), optim="sgd", learning_rate=0.5,
                     max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant")
    trainer = trainer_of(demo, tmp_path, model, args, objective="wga", hparams={"alpha": 0.8}, guidance="instance",
                         guidance_temperature=0.5, retain_weight=0.7)
    trainer.train()
    f_batch = forget_set.batch(range(len(forget)))
    r_batch = retain_set.batch([retain_index(3, 0, i, len(retain)) for i in range(len(forget))])
    params = dict(start.named_parameters())
    lp_r, valid_r = token_logprobs_by_logits(start, r_batch)
    r = torch.autograd.grad(0.7 * formulas.objective("nll", lp_r, valid_r), list(params.values()))
    lp, valid = token_logprobs_by_logits(start, f_batch)
    n = valid.sum()
    weight = formulas.token_weight("wga", lp.detach(), None, {"alpha": 0.8})
    parts = [torch.autograd.grad((weight[s] * lp[s] * valid[s]).sum() / n, list(params.values()), retain_graph=True,
                                 allow_unused=True) for s in range(len(forget))]
    parts = [[torch.zeros_like(p) if g is None else g for g, p in zip(part, params.values())] for part in parts]
    e = torch.tensor([sum(float((g * q).sum()) for g, q in zip(part, r)) for part in parts], dtype=torch.float64)
    z = (e - e.mean()) / e.std(unbiased=False)
    w = len(forget) * torch.softmax(z / 0.5, 0)
    record = [rec for rec in trainer.state.log_history if "loss" in rec][0]
    assert (record["weight_min"], record["weight_max"]) == pytest.approx((float(w.min()), float(w.max())), rel=1e-9)
    moved = dict(model.named_parameters())
    for i, (name, p) in enumerate(params.items()):
        grad = r[i] + sum(w[s] * parts[s][i] for s in range(len(forget)))
        torch.testing.assert_close(moved[name].detach(), p.detach() - 0.5 * grad, rtol=1e-9, atol=1e-12)


def test_primal_dual_raises_the_retain_weight_by_the_constraint(demo, tmp_path):
    """PDU: λ_0 = retain_weight, λ_{k+1} = max(0, λ_k + η (retain loss of update k − ε)), and the loss carries
    λ_k (retain loss − ε)."""
    eps, eta = 5.7, 3.0
    trainer = trainer_of(demo, tmp_path, args=arguments(tmp_path, max_steps=5, gradient_accumulation_steps=2),
                         objective="ga", retain_weight=0.4, primal_dual=eps, dual_step=eta)
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    dual = 0.4
    for record in records:
        assert record["dual"] == pytest.approx(dual, rel=1e-12)
        assert record["loss"] == pytest.approx(record["forget_loss"] + dual * (record["retain_loss"] - eps), rel=1e-6)
        dual = max(0.0, dual + eta * (record["retain_loss"] - eps))
    assert trainer.dual == pytest.approx(dual, rel=1e-6)
    assert len({r["dual"] for r in records}) > 2


def test_pairs_are_seeded_per_epoch_and_match_open_unlearning_anchoring():
    forget = [{"input_ids": [1, 2, i], "labels": [1, 2, i]} for i in range(7)]
    retain = [{"input_ids": [3, 4, i], "labels": [3, 4, i]} for i in range(5)]
    pairs = ForgetRetainPairs(forget, retain, seed=11)
    assert len(pairs) == len(forget)  # anchored on the forget set
    first = [pairs[i]["retain"]["input_ids"][-1] for i in range(7)]
    assert first == [pairs[i]["retain"]["input_ids"][-1] for i in range(7)]  # a function of the index
    assert [pairs[i]["forget"]["index"] for i in range(7)] == list(range(7))
    draws = [retain_index(11, epoch, i, 5) for epoch in range(40) for i in range(7)]
    assert sorted(set(draws)) == list(range(5))  # every retain example is drawn
    pairs.set_epoch(1)
    assert [pairs[i]["retain"]["input_ids"][-1] for i in range(7)] != first


REFUSALS = ["I don't know.", "I have no idea who that is.", "That is not something I can answer."]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_catalog_objective_trains(demo, tmp_path, objective):
    """Every row of the catalog (PO and DPO on substitute answers, RMU on a layer's activations) through the
    Trainer, two updates with G-effects measured at each."""
    forget = [{**record, "alternate": REFUSALS[i % 3]} for i, record in enumerate(demo[0])]
    retain_objective = "kl" if objective in ("npo", "ga") else "nll"
    trainer = trainer_of(demo, tmp_path, model_of(demo[2], dtype=torch.float32), objective=objective,
                         forget_dataset=forget, hparams=HPARAMS.get(objective, {}), retain_objective=retain_objective,
                         geffect_every=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert trainer.geffects.steps == [0, 1] and all(math.isfinite(v) for v in trainer.geffects.per_step("retain"))
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("retain_objective", [*RETAIN_TERMS, "none"])
def test_every_retain_term_trains(demo, tmp_path, retain_objective):
    trainer = trainer_of(demo, tmp_path, model_of(demo[2], dtype=torch.float32), objective="ga",
                         retain_objective=retain_objective,
                         retain_dataset=None if retain_objective == "none" else demo[1])
    trainer.train()
    record = [r for r in trainer.state.log_history if "loss" in r][0]
    assert math.isfinite(record["loss"]) and ("retain_loss" in record) == (retain_objective != "none")


def test_substitute_answers_from_a_file_and_tokenized(demo, tmp_path):
    """DPO's substitute answers as TOFU publishes them (a refusal per line), and as tokenized alternate_* fields:
    the same refusals give the same run."""
    from geffect_kernels.data.alternates import alternate_answers

    path = tmp_path / "idontknow.jsonl"
    path.write_text("\n".join(REFUSALS) + "\n")
    runs = []
    from_file = trainer_of(demo, tmp_path, objective="dpo", alternates=str(path), args=arguments(tmp_path, max_steps=1))
    from_file.train()
    answers = alternate_answers(path, [r["question"] for r in demo[0]])
    tokenizer, forget_set = demo[2], demo[3]
    from geffect_kernels.data import encode_pair
    tokenized = [{**e, **{"alternate_" + k: v for k, v in encode_pair(tokenizer, r["question"], a).items()}}
                 for e, r, a in zip(forget_set.examples, demo[0], answers)]
    by_fields = trainer_of(demo, tmp_path, objective="dpo", forget_dataset=tokenized,
                           args=arguments(tmp_path, max_steps=1))
    by_fields.train()
    for trainer in (from_file, by_fields):
        runs.append([r["loss"] for r in trainer.state.log_history if "loss" in r and "train_loss" not in r])
    assert runs[0] == runs[1]
    pairs = zip(from_file.reference.alternate_rows, by_fields.reference.alternate_rows)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_rmu_trains_only_its_layers(demo, tmp_path):
    trainer = trainer_of(demo, tmp_path, objective="rmu", hparams={"layer": 1.0}, retain_objective="rr")
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved.isdisjoint(frozen) and all("mlp.down_proj" in n for n in moved)


def test_kl_retain_term_starts_at_zero(demo, tmp_path):
    trainer = trainer_of(demo, tmp_path, objective="ga", retain_objective="kl")
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert abs(records[0]["retain_loss"]) < 1e-12 < records[1]["retain_loss"]  # the frozen copy is the start


def final_parameters(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_equals_the_larger_batch(demo, tmp_path):
    """NPO is a mean over sequences: two micro-batches of 2 averaged are one batch of 4 (same samples, same
    order), step for step."""
    runs = []
    for batch, accumulate in ((4, 1), (2, 2)):
        args = arguments(tmp_path / f"b{batch}", max_steps=2, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulate)
        trainer = trainer_of(demo, tmp_path, args=args, objective="npo", retain_objective="none",
                             retain_dataset=None)
        trainer.train()
        runs.append(([r["loss"] for r in trainer.state.log_history if "loss" in r], final_parameters(trainer)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)  # the Trainer sums logged losses in float32
    for name, p in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], p, rtol=1e-9, atol=1e-12)


def test_resume_from_checkpoint_ends_as_an_uninterrupted_run(demo, tmp_path):
    """Four steps in one go, and two, then a new Trainer (on a model with other weights: the checkpoint's weights,
    reference log-probabilities and G-effects are what count) resumed for the last two; the epoch changes on the
    way (a new pairing)."""
    settings = dict(objective="tnpo", hparams={"beta": 2.0}, geffect_every=1, primal_dual=5.7, dual_step=0.5)
    whole = trainer_of(demo, tmp_path, args=arguments(tmp_path / "whole", max_steps=4), **settings)
    whole.train()
    args = arguments(tmp_path / "parts", max_steps=4, save_strategy="steps", save_steps=2)
    first = trainer_of(demo, tmp_path, args=args, **settings)
    first.train()  # writes checkpoints 2 and 4; resume from 2
    second = trainer_of(demo, tmp_path, model_of(demo[2], seed=9), args=args, **settings)
    second.train(resume_from_checkpoint=str(tmp_path / "parts" / "out" / "checkpoint-2"))
    for name, p in final_parameters(whole).items():
        torch.testing.assert_close(final_parameters(second)[name], p, rtol=1e-9, atol=1e-12)
    assert second.geffects.steps == whole.geffects.steps == [0, 1, 2, 3]
    assert second.dual == whole.dual != 1.0  # PDU's dual variable came back from the checkpoint
    assert second.geffects.per_step("retain") == pytest.approx(whole.geffects.per_step("retain"), rel=1e-8)
    losses = lambda t: [r["loss"] for r in t.state.log_history if "loss" in r]  # noqa: E731
    assert losses(second)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-6)


def test_geffects_reach_tensorboard(demo, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = arguments(tmp_path, max_steps=5, report_to=["tensorboard"])
    trainer = trainer_of(demo, tmp_path, args=args, objective="npo", geffect_every=2)
    trainer.train()
    assert trainer.geffects.steps == [0, 2, 4]
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    for risk in ("forget", "retain"):
        scalars = events.Scalars(f"train/e_{risk}")
        assert [s.step for s in scalars] == [0, 2, 4]
        assert [s.value for s in scalars] == pytest.approx(trainer.geffects.per_step(risk), rel=1e-6)
    assert [s.step for s in events.Scalars("train/forget_loss")] == [1, 2, 3, 4, 5]


def test_geffects_equal_the_profiler_on_the_steps_first_batch(demo, tmp_path):
    """The measurement at step 0 is the profiler's at the starting parameters on the first micro-batch pair."""
    seen = []

    trainer = trainer_of(demo, tmp_path, objective="wga", geffect_every=3, args=arguments(tmp_path, max_steps=1))
    original = trainer.compute_loss

    def spy(model, inputs, **kwargs):
        seen.append({side: {k: v.clone() for k, v in batch.items()} for side, batch in inputs.items()})
        return original(model, inputs, **kwargs)

    trainer.compute_loss = spy
    start = model_of(demo[2])
    trainer.train()
    from geffect_kernels.geffect import GEffectProfiler
    forget = {k: v for k, v in seen[0]["forget"].items() if k != "index"}
    expected = GEffectProfiler(start).measure_unlearning("wga", forget, seen[0]["retain"])
    assert trainer.geffects.per_step("forget") == pytest.approx([expected.total["forget"]], rel=1e-9)
    assert trainer.geffects.per_step("retain") == pytest.approx([expected.total["retain"]], rel=1e-9)


def test_stop_rule_ends_before_the_update(demo, tmp_path):
    trainer = trainer_of(demo, tmp_path, args=arguments(tmp_path, max_steps=6), objective="ga", geffect_every=1,
                         stop_when="step>3")
    trainer.train()
    assert trainer.state.global_step == 3  # the rule fired on the G-effects before the fourth update
    stop = [r for r in trainer.state.log_history if "stopped" in r]
    assert len(stop) == 1 and stop[0]["stopped_at"] == 3 and stop[0]["stopped"].startswith("step>3")


def test_lora_reference_is_the_model_without_adapters(demo, tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = demo[2]
    base = model_of(tokenizer)
    plain = model_of(tokenizer)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    trainer = trainer_of(demo, tmp_path, model, objective="npo", retain_objective="kl",
                         args=arguments(tmp_path, max_steps=1))
    trainer.train()
    rows = trainer.reference.rows
    batch = demo[3].batch(range(len(demo[3])))
    expected = hf.token_logprobs(plain, batch)
    for i, row in enumerate(rows):
        torch.testing.assert_close(row.double(), expected[i, : len(row)].float().double(), rtol=0, atol=1e-6)
    assert type(trainer.reference.model).__name__ == "AdaptersDisabled"  # no second copy of the model


def test_given_reference_logprobs_are_used(demo, tmp_path):
    computed = trainer_of(demo, tmp_path, objective="npo", args=arguments(tmp_path, max_steps=1))
    computed.train()
    shifted = [row - 0.25 for row in computed.reference.rows]
    given = trainer_of(demo, tmp_path, objective="npo", args=arguments(tmp_path, max_steps=1), ref_logprobs=shifted)
    given.train()
    assert all(torch.equal(a, b) for a, b in zip(given.reference.rows, shifted))
    loss = lambda t: [r["forget_loss"] for r in t.state.log_history if "loss" in r][0]  # noqa: E731
    assert loss(given) != pytest.approx(loss(computed), rel=1e-3)


class Rows:
    """What a ``datasets.Dataset`` offers the Trainer: a length and rows by index (not a Python sequence)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {k: torch.tensor(v) for k, v in self.rows[index].items()}


def test_tokenized_examples_in_a_datasets_style_sequence(demo, tmp_path):
    forget_set, retain_set = demo[3], demo[4]
    forget = Rows(forget_set.examples)
    trainer = trainer_of(demo, tmp_path, forget_dataset=forget, retain_dataset=retain_set.examples,
                         processing_class=None, objective="simnpo")
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "nope"}, "objective/hparams: unknown objective 'nope'"),
    ({"objective": "npo", "hparams": {"beta": -1.0}}, "objective/hparams:"),
    ({"objective": "npo", "hparams": {"alpha": 1.0}}, "objective/hparams:"),
    ({"retain_objective": "mse"}, "retain_objective: unknown 'mse'"),
    ({"retain_weight": -1.0}, "retain_weight must be"),
    ({"forget_weight": float("nan")}, "forget_weight must be"),
    ({"geffect_every": -2}, "geffect_every must be"),
    ({"stop_when": "step>3"}, "stop_when: its rules read the G-effects"),
    ({"stop_when": "speed<1", "geffect_every": 1}, "stop_when: --stop-when: unknown quantity"),
    ({"forget_dataset": []}, "forget_dataset is empty"),
    ({"forget_dataset": [{"text": "a"}]}, "forget_dataset[0] has neither"),
    ({"processing_class": None}, "forget_dataset holds question/answer records: pass the tokenizer"),
    ({"retain_dataset": None}, "retain_dataset: retain_objective 'nll' needs one"),
    ({"train_dataset": [1]}, "train_dataset: UnlearningTrainer builds it"),
    ({"ref_logprobs": [[0.0]]}, "ref_logprobs has 1 rows for 11 forget examples"),
    ({"primal_dual": -1.0}, "primal_dual must be a finite number ≥ 0"),
    ({"primal_dual": 1.0, "retain_objective": "none", "retain_dataset": None}, "primal_dual: the constraint is on"),
    ({"objective": "dpo"}, "forget_dataset: objective 'dpo' reads a substitute answer"),
    ({"objective": "po", "alternates": ["no"]}, "alternates must be a file or 11 non-empty strings"),
    ({"objective": "po", "alternates": "/nonexistent/idk.jsonl"}, "alternates: /nonexistent/idk.jsonl"),
    ({"objective": "rmu", "hparams": {"layer": 7.0}}, "objective/hparams:"),
    ({"guidance": "steer"}, "guidance: unknown 'steer'"),
    ({"guidance": "instance", "retain_objective": "kl"}, "guidance: instance weighting needs the nll retain term"),
    ({"guidance": "instance", "objective": "rmu"}, "guidance: instance weighting needs an objective of the forget"),
    ({"guidance": "instance", "guidance_temperature": 0}, "guidance_temperature must be a positive number"),
    ({"guidance": "rectify", "retain_objective": "none"}, "guidance: rectify steers the objective"),
    ({"backend": "nope"}, "nope"),
])
def test_bad_arguments_are_one_line_value_errors(demo, tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        trainer_of(demo, tmp_path, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resume_needs_the_trainers_checkpoint(demo, tmp_path):
    trainer = trainer_of(demo, tmp_path)
    with pytest.raises(ValueError, match="resume_from_checkpoint: no checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    (tmp_path / "alien").mkdir()
    with pytest.raises(ValueError, match="has no unlearning_state.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "alien"))


def test_bf16_where_the_machine_has_it(demo, tmp_path):
    args = arguments(tmp_path, bf16=True, max_steps=1)
    trainer = trainer_of(demo, tmp_path, model_of(demo[2], dtype=torch.float32), args=args, objective="wtnpo")
    trainer.train()
    assert np.isfinite([r["loss"] for r in trainer.state.log_history if "loss" in r]).all()
