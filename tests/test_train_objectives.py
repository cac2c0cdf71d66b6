"""The loop with PO, DPO, RMU, the RR retain term and PDU: substitute answers from a file, the parameters RMU trains,
the dual variable's update, log and checkpoint (a resumed run continues it bit-identically), and bad input refused
before anything is written."""
import json

import pytest
import torch

from geffect_kernels.data.alternates import alternate_answers
from geffect_kernels.data.errors import DataError
from geffect_kernels.train import TrainConfig, load_checkpoint, tiny_llama, train
from demo_cases import encoded_sets

pytestmark = pytest.mark.usefixtures("one_thread")
REFUSALS = ["I'm not sure.", "I don't have that information.", "That's beyond my current knowledge base."]


@pytest.fixture(scope="module")
def setup():
    return encoded_sets()


@pytest.fixture
def idk(tmp_path):
    path = tmp_path / "idontknow.jsonl"  # TOFU's format: plain text, one refusal per line
    path.write_text("\n".join(REFUSALS) + "\n")
    return str(path)


def model_of(tokenizer, layers=2):
    return tiny_llama(tokenizer, hidden_size=32, layers=layers, heads=2, intermediate_size=64, seed=0)


def config(tmp_path=None, **kw):
    base = dict(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, progress=False,
                out_dir=str(tmp_path) if tmp_path else None)
    return TrainConfig(**{**base, **kw})


def test_alternate_answers_from_tofu_refusals_or_records(tmp_path, idk):
    questions = [f"q{i}?" for i in range(20)]
    drawn = alternate_answers(idk, questions, seed=3)
    assert drawn == alternate_answers(idk, questions, seed=3) and set(drawn) <= set(REFUSALS)
    assert drawn != alternate_answers(idk, questions, seed=4) and len(set(drawn)) > 1
    records = tmp_path / "alt.json"
    records.write_text(json.dumps([{"question": q, "answer": f"a{i}"} for i, q in enumerate(questions)]))
    assert alternate_answers(records, questions[::-1]) == [f"a{i}" for i in range(19, -1, -1)]
    for text, match in (("\n  \n", "holds no substitute answers"),
                        (json.dumps([{"question": "other?", "answer": "x"}]), "no answer for forget question")):
        records.write_text(text)
        with pytest.raises(DataError, match=match):
            alternate_answers(records, questions)


@pytest.mark.parametrize("objective", ["po", "dpo"])
def test_po_and_dpo_train_on_substitute_answers(setup, tmp_path, idk, objective):
    tokenizer, forget, retain = setup
    result = train(model_of(tokenizer), forget, retain, config(tmp_path, objective=objective, alternate=idk,
                                                               geffect_every=2))
    assert len(result.metrics) == 4 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert len(result.geffects.steps) == 2 and result.geffects.results[0].retain_term is not None
    if objective == "po":  # PO lowers the NLL of the refusals
        assert result.metrics[-1]["forget_loss"] < result.metrics[0]["forget_loss"]


def test_rmu_trains_only_the_rmu_code_parameters_and_rr_holds_its_layer(setup, tmp_path):
    tokenizer, forget, retain = setup
    model = model_of(tokenizer, layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, forget, retain, config(objective="rmu", retain_objective="rr", retain_weight=5.0))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}  # layer 1 of 4
    assert result.metrics[-1]["forget_loss"] < result.metrics[0]["forget_loss"]
    assert result.metrics[0]["retain_loss"] == 0 < result.metrics[-1]["retain_loss"]


def test_primal_dual_updates_logs_and_resumes_its_dual_variable(setup, tmp_path):
    tokenizer, forget, retain = setup
    settings = dict(objective="ga", primal_dual=2.0, retain_weight=0.5, dual_step_size=0.3, steps=6)
    full = train(model_of(tokenizer), forget, retain, config(tmp_path / "a", **settings))
    duals = [m["dual"] for m in full.metrics]
    assert duals[0] == 0.5
    for m, next_dual in zip(full.metrics, duals[1:]):  # λ ← max(0, λ + η (retain loss − ε))
        assert next_dual == max(0.0, m["dual"] + 0.3 * (m["retain_loss"] - 2.0))
    for m in full.metrics:  # the Lagrangian, forget + λ (retain − ε)
        assert m["loss"] == pytest.approx(m["forget_loss"] + m["dual"] * (m["retain_loss"] - 2.0), rel=1e-6)
    assert load_checkpoint(tmp_path / "a")["dual"] == max(0.0, duals[-1] + 0.3 * (full.metrics[-1]["retain_loss"] - 2))

    def crash_at_step_5(model, calls=[0]):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt("killed")
        return {}
    with pytest.raises(KeyboardInterrupt):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "b", eval_every=1, **settings),
              evaluate=crash_at_step_5)
    assert load_checkpoint(tmp_path / "b")["step"] == 4
    model = model_of(tokenizer)
    resumed = train(model, forget, retain, config(tmp_path / "b", **settings))
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert resumed.resumed_from == 4 and strip(resumed.metrics) == strip(full.metrics)
    for a, b in zip(full.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("settings, match", [
    (dict(objective="po"), "reads substitute answers"),
    (dict(objective="rmu", hparams={"layer": 7}), "outside the model's 2 decoder layers"),
    (dict(objective="ga", retain_objective="rr", hparams={}), None),
])
def test_bad_input_is_refused_before_anything_is_written(setup, tmp_path, settings, match):
    tokenizer, forget, retain = setup
    if match is None:  # RR with a layer-less objective: the default layer, it trains
        assert train(model_of(tokenizer), forget, retain, config(**settings)).metrics
        return
    with pytest.raises(ValueError, match=match):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "out", **settings))
    assert not (tmp_path / "out").exists()


def test_primal_dual_settings_are_checked():
    with pytest.raises(ValueError, match="primal_dual"):
        TrainConfig(primal_dual=-1.0)
    with pytest.raises(ValueError, match="needs a retain term"):
        TrainConfig(primal_dual=0.5, retain_objective="none")
    with pytest.raises(ValueError, match="guidance"):
        TrainConfig(objective="po", guidance="rectify")


def test_several_processes_refuse_what_they_do_not_share_yet(setup):
    from geffect_kernels.train.distributed import check_world
    from geffect_kernels.train.memory_plan import PlanSettings

    _, forget, retain = setup
    for settings in (dict(objective="rmu"), dict(objective="po"), dict(retain_objective="rr")):
        check_world(1, TrainConfig(**settings), forget, retain)  # one process: fine
        with pytest.raises(ValueError, match="one process only"):
            check_world(2, TrainConfig(**settings), forget, retain)
    assert PlanSettings(objective="rmu", retain_objective="rr", batch_size=2, seq_len=8, n_forget=4)
