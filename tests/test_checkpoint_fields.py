"""Checkpoints that load ``weights_only`` but hold the wrong types, and metrics logs whose lines are not records:
each is one line naming the file and the field, before the run changes anything."""
import json

import pytest
import torch

from geffect_kernels.train import CheckpointError, train
from geffect_kernels.train.checkpoint import CHECKPOINT, save_checkpoint
from geffect_kernels.train.sharded_checkpoint import read_loop_state, read_rng, rng_file
from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)
from test_train import config, model_of, setup  # noqa: F401  (setup is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A 2-step run's folder and its checkpoint as loaded."""
    tokenizer, forget, retain = setup
    folder = tmp_path_factory.mktemp("trained")
    train(model_of(tokenizer), forget, retain, config(folder, objective="ga", steps=2))
    return folder, torch.load(folder / CHECKPOINT, weights_only=True)


def _shrunk(model):
    name = next(iter(model))
    return {**model, name: model[name][:-1]}, name


BAD_FIELDS = [
    ("step", lambda s: "abc", "step must be an integer >= 0, got 'abc'"),
    ("settings", lambda s: [1, 2], "settings must map each setting to its value, got [1, 2]"),
    ("rng", lambda s: torch.zeros(3, dtype=torch.uint8), "rng must be the CPU generator's state"),
    ("model", lambda s: {}, "model must map parameter names to tensors, got {}"),
    ("geffects", lambda s: "abc", "geffects is not a G-effect history"),
    ("setting_changes", lambda s: 3, "setting_changes must be a list of {step, before}, got 3"),
    ("cuda_rng", lambda s: "abc", "cuda_rng must be a list of RNG states"),
    ("dual", lambda s: "abc", "dual must be a finite number (PDU's dual variable) or null, got 'abc'"),
]


@pytest.mark.parametrize("field, bad, message", BAD_FIELDS, ids=[case[0] for case in BAD_FIELDS])
def test_a_field_of_the_wrong_type_is_named(setup, trained, tmp_path, field, bad, message):
    tokenizer, forget, retain = setup
    folder, state = trained
    save_checkpoint(tmp_path, {**state, field: bad(state)})
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError) as info:
        train(model_of(tokenizer), forget, retain, config(tmp_path, objective="ga", steps=2))
    assert str(info.value).startswith(f"{tmp_path / CHECKPOINT}: {message}") and "\n" not in str(info.value)
    assert (tmp_path / "metrics.jsonl").read_text() == "" and not (tmp_path / "config.json").exists()


def test_a_model_of_another_shape_is_named_with_its_parameter(setup, trained, tmp_path):
    tokenizer, forget, retain = setup
    folder, state = trained
    model, name = _shrunk(state["model"])
    save_checkpoint(tmp_path, {**state, "model": model})
    with pytest.raises(CheckpointError, match=rf"checkpoint.pt: model does not fit this run \(ValueError: its "
                                              rf"{name} has shape"):
        train(model_of(tokenizer), forget, retain, config(tmp_path, objective="ga", steps=2))
    shapes = {k: v.shape for k, v in state["model"].items()}
    optimizer = state["optimizer"]
    index = next(iter(optimizer["state"]))
    moment = optimizer["state"][index]["exp_avg"]
    broken = {**optimizer, "state": {**optimizer["state"],
                                     index: {**optimizer["state"][index], "exp_avg": moment.reshape(-1)[:-1]}}}
    save_checkpoint(tmp_path, {**state, "optimizer": broken})
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: optimizer does not fit this run \(ValueError: its "
                                              r"exp_avg has shape"):
        train(model_of(tokenizer), forget, retain, config(tmp_path, objective="ga", steps=2))
    assert len(shapes) > 1


@pytest.mark.parametrize("line", ["[1, 2]", '{"step": "x"}', '{"loss": 1.0}'])
def test_a_metrics_line_that_is_no_record_is_named(setup, trained, tmp_path, line):
    tokenizer, forget, retain = setup
    folder, state = trained
    save_checkpoint(tmp_path, state)
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 1.0}}\n{line}\n{{"step": 2, "loss": 1.0}}\n')
    with pytest.raises(CheckpointError) as info:
        train(model_of(tokenizer), forget, retain, config(tmp_path, objective="ga", steps=2))
    assert str(info.value).startswith(f"{tmp_path / 'metrics.jsonl'} line 2: not a step's record")


def test_sharded_loop_state_and_rng_of_the_wrong_types_are_named(tmp_path):
    (tmp_path / "loop.json").write_text(json.dumps({"step": 2, "settings": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"loop.json: settings must map each setting to its value, got \[1, 2"):
        read_loop_state(tmp_path)
    (tmp_path / "loop.json").write_text(json.dumps({"step": 2, "settings": {}, "geffects": {"records": 3}}))
    with pytest.raises(CheckpointError, match=r"loop.json: geffects is not a G-effect history \(TypeError"):
        read_loop_state(tmp_path)
    torch.save({"rng": torch.zeros(3, dtype=torch.uint8)}, rng_file(tmp_path, 1))
    with pytest.raises(CheckpointError, match=r"rng-1.pt: rng must be the CPU generator's state \(\d+ bytes\), got "
                                              r"a tensor of shape \[3\]"):
        read_rng(tmp_path, 1)


def test_the_command_says_it_in_one_line(capsys, workspace, tmp_path):
    w, out = workspace, tmp_path / "out"
    argv = ["train", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
            "--batch-size", 2, "--no-progress", "--out", out, "--steps", 1]
    assert run(capsys, *argv)[0] == 0
    path = out / "runs" / "ga" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    save_checkpoint(path.parent, {**state, "step": "abc"})
    code, _, err = run(capsys, *argv)
    assert code == 1 and err == (f"geffect: error: {path}: step must be an integer >= 0, got 'abc'; delete it or "
                                 f"pass --overwrite (resume=False)\n")
