"""`GEffectCallback` inside a real `transformers.Trainer` run (`Trainer` needs `accelerate`): what it records,
at which parameters, and that it leaves the model and the training run as they would be without it."""
import copy
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from geffect_kernels import hf
from geffect_kernels.data import collate
from geffect_kernels.geffect import GEffectHistory, GEffectProfiler
from geffect_kernels.hf_callback import GEffectCallback
from geffect_kernels.train import tiny_llama
from demo_cases import encoded_sets

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 5, 2


@pytest.fixture(scope="module")
def setup():
    tokenizer, forget, retain = encoded_sets()
    return tokenizer, forget, retain, forget.batch(range(4)), retain.batch(range(4))


def model_of(tokenizer, seed=0, dropout=0.2):
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=seed)
    # Dropout makes train-mode forwards random (and draw from the run's random stream): the callback must
    # measure in eval mode, leaving training exactly as it would be without it
    model.config.attention_dropout = dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    return model


def trainer_for(model, data, tmp_path, callbacks):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=0, seed=0,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             eval_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data.examples,
                   data_collator=lambda examples: collate(examples, data.pad_id), callbacks=callbacks)


class Snapshots(TrainerCallback):
    """The parameters at the start of each step: the initial ones, then those after step s-1's update."""

    def __init__(self):
        self.states = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())


def model_state(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(m._backward_pre_hooks) for m in model.modules())
    return dict(hooks=hooks, training=[m.training for m in model.modules()],
                requires_grad=[p.requires_grad for p in model.parameters()],
                grads=[p.grad for p in model.parameters() if p.grad is not None])


class Around(TrainerCallback):
    """Placed before and after the G-effect callback: the model as it was before it and as it left it."""

    def __init__(self, seen):
        self.seen = seen

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.setdefault(state.global_step, []).append(model_state(model))


def direct(tokenizer, state, forget_batch, retain_batch, ref):
    model = model_of(tokenizer, seed=1)
    model.load_state_dict(state)
    return GEffectProfiler(model).measure_unlearning("npo", forget_batch, retain_batch, ref_logprobs=ref, beta=0.5)


def test_trainer_run_records_geffects_at_the_steps_parameters(setup, tmp_path):
    tokenizer, forget, retain, forget_batch, retain_batch = setup
    model = model_of(tokenizer)
    with torch.no_grad():
        ref = hf.token_logprobs(model, forget_batch)
    callback = GEffectCallback(forget_batch, retain_batch, objective="npo", every=EVERY, ref_logprobs=ref, beta=0.5,
                               output_dir=tmp_path / "geffects")
    snapshots, seen = Snapshots(), {}
    trainer_for(model, retain, tmp_path, [snapshots, Around(seen), callback, Around(seen)]).train()

    history = callback.history
    assert history.steps == list(range(0, STEPS, EVERY)) == [0, 2, 4]
    assert set(history.risks) == {"forget", "retain"} and set(history.groups) >= {"layer.0", "layer.1"}
    for result in history.results:
        values = [*result.total.values(), *(v for g in result.by_group.values() for v in g.values()),
                  *result.losses.values()]
        assert all(math.isfinite(v) for v in values)
        for risk in ("forget", "retain"):
            assert sum(g[risk] for g in result.by_group.values()) == pytest.approx(result.total[risk], rel=1e-9)

    # The training moved the parameters, so a measurement at another step's parameters would not match
    states = snapshots.states
    assert sorted(states) == list(range(STEPS + 1))
    assert not torch.equal(states[0]["lm_head.weight"], states[1]["lm_head.weight"])
    for step, recorded in zip(history.steps, history.results):
        expected = direct(tokenizer, states[step], forget_batch, retain_batch, ref)
        for risk in ("forget", "retain"):
            assert recorded.total[risk] == pytest.approx(expected.total[risk], rel=1e-6, abs=1e-9)
            for group, values in expected.by_group.items():
                assert recorded.by_group[group][risk] == pytest.approx(values[risk], rel=1e-6, abs=1e-9)
        assert recorded.losses == pytest.approx(expected.losses, rel=1e-6)
        one_step_later = direct(tokenizer, states[step + 1], forget_batch, retain_batch, ref)
        assert recorded.total["forget"] != pytest.approx(one_step_later.total["forget"], rel=1e-3)

    # The model as the callback found it: no hooks, no .grad, same modes and requires_grad
    assert sorted(seen) == list(range(STEPS))
    for step, states_around in seen.items():
        before, after = states_around
        assert after == before and after["hooks"] == 0 and after["grads"] == []

    # Training went exactly as without the callback (dropout included)
    plain = model_of(tokenizer)
    trainer_for(plain, retain, tmp_path, []).train()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name

    saved = GEffectHistory.from_json(tmp_path / "geffects" / "geffects.json")
    assert saved.steps == history.steps and saved.per_step("retain") == history.per_step("retain")
    assert (tmp_path / "geffects" / "geffects.csv").is_file()


def test_a_reused_callback_measures_the_new_run(setup, tmp_path):
    tokenizer, forget, retain, forget_batch, retain_batch = setup
    callback = GEffectCallback(forget_batch, retain_batch, objective="ga", every=EVERY)
    first, second = model_of(tokenizer, seed=0), model_of(tokenizer, seed=2)
    initial = copy.deepcopy(second.state_dict())
    trainer_for(first, retain, tmp_path, [callback]).train()
    trainer_for(second, retain, tmp_path, [callback]).train()  # steps 0, 2, 4 again, on another model

    assert callback.history.steps == [0, 2, 4]
    fresh = model_of(tokenizer, seed=1)
    fresh.load_state_dict(initial)
    expected = GEffectProfiler(fresh).measure_unlearning("ga", forget_batch, retain_batch)
    assert callback.history.per_step("forget")[0] == pytest.approx(expected.total["forget"], rel=1e-6)


def test_npo_without_ref_logprobs_takes_the_starting_models(setup, tmp_path):
    tokenizer, forget, retain, forget_batch, retain_batch = setup
    model = model_of(tokenizer)
    with torch.no_grad():
        ref = hf.token_logprobs(model.eval(), forget_batch)
    given = GEffectCallback(forget_batch, retain_batch, objective="npo", every=EVERY, ref_logprobs=ref, beta=0.5)
    trainer_for(model, retain, tmp_path, [given]).train()
    taken = GEffectCallback(forget_batch, retain_batch, objective="npo", every=EVERY, beta=0.5)
    trainer_for(model_of(tokenizer), retain, tmp_path, [taken]).train()
    assert taken.ref_logprobs.device.type == "cpu"
    torch.testing.assert_close(taken.ref_logprobs, ref, rtol=0, atol=0)
    assert taken.history.per_step("forget") == given.history.per_step("forget")
    assert taken.history.per_step("retain") == given.history.per_step("retain")


def test_po_and_rmu_with_the_rr_and_kl_terms_inside_a_trainer(setup, tmp_path):
    """Objectives that read substitute answers or a layer's activations, retain terms against the starting model:
    recorded as `measure_unlearning` gives them at the same parameters."""
    from geffect_kernels.objective_inputs import ReferenceState, with_alternate

    tokenizer, forget, retain, forget_batch, retain_batch = setup
    start = model_of(tokenizer, dropout=0.0)
    reference = ReferenceState(model=copy.deepcopy(start).eval())
    probe = with_alternate(forget_batch, retain.batch(range(4, 8)))  # other answers stand in for refusals
    for objective, term in (("po", "kl"), ("rmu", "rr")):
        model, snapshots = model_of(tokenizer, dropout=0.0), Snapshots()
        callback = GEffectCallback(probe, retain_batch, objective=objective, every=EVERY, reference=reference,
                                   retain_objective=term)
        trainer_for(model, forget, tmp_path / objective, [snapshots, callback]).train()
        assert callback.history.steps == [0, 2, 4]
        for step, result in zip(callback.history.steps, callback.history.results):
            again = model_of(tokenizer, dropout=0.0)
            again.load_state_dict(snapshots.states[step])
            expected = GEffectProfiler(again.eval()).measure_unlearning(objective, probe, retain_batch,
                                                                        reference=reference, retain_objective=term)
            assert result.total == pytest.approx(expected.total, rel=1e-6, abs=1e-9)
            assert result.retain_term.total == pytest.approx(expected.retain_term.total, rel=1e-6, abs=1e-9)
        assert callback.history.results[0].retain_term.total["retain"] == 0  # KL and RR: 0 at the start
        assert callback.history.results[-1].retain_term.total["retain"] != 0
