"""The loop: schedules, resume after an interruption equals an uninterrupted run, NaN handling, the
reference cache, G-effect recording and bad input."""
import json

import pytest
import torch

from geffect_kernels.train import (Run, TrainConfig, TrainingDiverged, batch_indices, load_checkpoint, run_steps,
                                   tiny_llama, train, warmup_linear_decay)
from geffect_kernels.train.checkpoint import atomic_write_text
from demo_cases import encoded_sets


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return encoded_sets()


def model_of(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0)


def config(tmp_path=None, **kw):
    base = dict(objective="npo", steps=6, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_every=2,
                progress=False, out_dir=str(tmp_path) if tmp_path else None)
    return TrainConfig(**{**base, **kw})


def test_batch_indices_cover_each_epoch_once():
    n, bs = 10, 4
    first_epoch = [i for mb in range(3) for i in batch_indices(n, bs, seed=1, micro_batch=mb)]
    assert sorted(set(first_epoch)) == list(range(n)) and len(first_epoch) == 12  # the last batch wraps around
    assert batch_indices(n, bs, 1, 5) == batch_indices(n, bs, 1, 5)
    assert batch_indices(n, bs, 1, 3) != batch_indices(n, bs, 2, 3)
    assert batch_indices(3, 8, 0, 0) == batch_indices(3, 8, 0, 0) and len(batch_indices(3, 8, 0, 0)) == 3


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(2, 10)
    assert [f(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(6) == pytest.approx(0.5) and f(10) == 0.0


def test_resume_after_interruption_equals_uninterrupted_run(setup, tmp_path):
    tokenizer, forget, retain = setup
    straight = model_of(tokenizer)
    full = train(straight, forget, retain, config(tmp_path / "a"))

    calls = {"n": 0}

    def crash_at_step_5(model):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "b", eval_every=1), evaluate=crash_at_step_5)
    assert load_checkpoint(tmp_path / "b")["step"] == 4
    resumed_model = model_of(tokenizer)  # the starting model again: the reference copy comes from it
    resumed = train(resumed_model, forget, retain, config(tmp_path / "b"))
    assert resumed.resumed_from == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed.metrics) == strip(full.metrics)
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 7))
    assert (tmp_path / "b" / "model" / "config.json").is_file()


class Recording(Run):
    """A `Run` that records what `run_steps` asks of its extension points and changes nothing."""

    def __init__(self, *args):
        self.seen = {"micro": [], "checkpoints": [], "reference": 0}
        super().__init__(*args)

    def micro_step_losses(self, micro):
        self.seen["micro"].append(micro)
        return super().micro_step_losses(micro)

    def reference_logprobs(self, indices, width):
        self.seen["reference"] += 1
        return super().reference_logprobs(indices, width)

    def write_checkpoint(self, number):
        self.seen["checkpoints"].append(number)
        super().write_checkpoint(number)


def test_run_and_run_steps_are_train_and_a_subclass_plugs_in(setup, tmp_path):
    tokenizer, forget, retain = setup
    expected = train(model_of(tokenizer), forget, retain, config(tmp_path / "a", steps=5))
    run = Recording(model_of(tokenizer), forget, retain, config(tmp_path / "b", steps=5))
    run.resume(None)
    run_steps(run)
    got = run.finish()
    untimed = lambda metrics: [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]
    assert untimed(got.metrics) == untimed(expected.metrics) and len(got.metrics) == 5
    assert run.seen == {"micro": list(range(10)), "checkpoints": [2, 4, 5], "reference": 10}  # grad_accum 2
    assert load_checkpoint(tmp_path / "b")["step"] == 5 and (tmp_path / "b" / "model").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    tokenizer, forget, retain = setup
    model = model_of(tokenizer)

    def poison_at_step_3(m):
        if poison_at_step_3.calls == 2:
            with torch.no_grad():
                m.model.norm.weight.fill_(float("nan"))
        poison_at_step_3.calls += 1
        return {}
    poison_at_step_3.calls = 0
    with pytest.raises(TrainingDiverged, match=r"NaN or inf at step 4; stopped, the last good checkpoint is step 2"):
        train(model, forget, retain, config(tmp_path, objective="ga", eval_every=1), evaluate=poison_at_step_3)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_reference_logprobs_computed_once_per_sample(setup, monkeypatch):
    tokenizer, forget, retain = setup
    from geffect_kernels.train import frozen_model as reference
    seen = []
    original = reference.hf.token_logprobs

    def counting(model, batch, **kw):
        seen.append(batch["input_ids"].shape[0])
        return original(model, batch, **kw)
    monkeypatch.setattr(reference.hf, "token_logprobs", counting)
    train(model_of(tokenizer), forget, retain, config(objective="tnpo", steps=4))
    assert sum(seen) == len(forget)


@pytest.mark.parametrize("objective, retain_objective", [("wtnpo", "kl"), ("simnpo", "none"), ("satimp", "nll")])
def test_every_objective_and_retain_term_moves_the_model_and_logs_its_retain_loss(setup, objective,
                                                                                   retain_objective):
    tokenizer, forget, retain = setup
    model = model_of(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, forget, retain if retain_objective != "none" else None,
                   config(objective=objective, retain_objective=retain_objective, steps=2, grad_accum=1))
    assert len(result.metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # every parameter was updated
    first, second = (m["retain_loss"] for m in result.metrics)
    if retain_objective == "none":
        assert first == second == 0
    elif retain_objective == "kl":  # the first step's model is the reference itself; the second has moved
        assert abs(first) < 1e-6 < second
    else:  # nll: a positive cross-entropy
        assert first > 0 and second > 0


def test_ga_lowers_forget_likelihood_and_records_geffects(setup, tmp_path):
    tokenizer, forget, retain = setup
    result = train(model_of(tokenizer), forget, retain,
                   config(tmp_path, objective="ga", retain_weight=0.0, steps=4, geffect_every=2, lr=3e-3))
    # GA's loss is mean ℓ_t, minimized: it must fall
    assert result.metrics[-1]["forget_loss"] < result.metrics[0]["forget_loss"]
    assert result.geffects.steps == [1, 3]
    assert all(m.get("e_forget", -1) < 0 for m in result.metrics if "e_forget" in m)
    assert json.loads((tmp_path / "geffects.json").read_text())["objective"] == "ga"


def test_bad_input(setup):
    tokenizer, forget, retain = setup
    from geffect_kernels.data import EncodedSet
    with pytest.raises(ValueError, match="forget set is empty"):
        train(model_of(tokenizer), EncodedSet([], 0), retain, config())
    with pytest.raises(ValueError, match="needs a non-empty retain set"):
        train(model_of(tokenizer), forget, None, config())
    with pytest.raises(ValueError, match="unknown objective"):
        TrainConfig(objective="nope")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"stepz": 3})


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    from geffect_kernels.train.checkpoint import atomic_write

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]

