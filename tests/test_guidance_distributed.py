"""Rectify guidance on two gloo ranks (FSDP2; per-group products of the shards summed with one all-reduce) against
one process: the same losses, the same groups rectified, the same weights; with LoRA adapters too."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from geffect_kernels.cli import main

from ranks import run_ranks
from test_cli import make_workspace, write_run_yaml

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 600  # a hang, not a slow machine: CI shares its cores


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("guided"))
    return write_run_yaml(root, objective="ga", steps=2, lr=0.01, batch_size=5, geffect_every=0, checkpoint_every=2,
                          backend="torch", guidance="rectify")


def metrics(out):
    return [json.loads(line) for line in (out / "runs" / "ga" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rectify_on_two_ranks_equals_one_process(capsys, workspace, tmp_path, lora):
    args = ["train", "--config", workspace / "run.yaml", "--no-progress"]
    if lora:
        args += ["--lora-r", 2, "--lora-targets", "q_proj,down_proj", "--lr", 0.1]
    code = main([str(a) for a in [*args, "--out", tmp_path / "one"]])
    assert code == 0, capsys.readouterr().err
    run_ranks(["-m", "geffect_kernels", *args, "--out", tmp_path / "two"], world=2, timeout=TIMEOUT)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2]
    assert any(m["rectified_groups"] > 0 for m in one)  # the projection is exercised, not only the pass-through
    for a, b in zip(one, two):
        assert b["rectified_groups"] == a["rectified_groups"], a["step"]
        for key in ("forget_loss", "retain_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), (a["step"], key)
        # the total is a difference of the two terms: float32 round-off of each, not of it
        scale = abs(a["forget_loss"]) + abs(a["retain_loss"])
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5 * scale), a["step"]
    folder = lambda run: run / "runs" / "ga" / "model"
    if lora:
        expected = load_file(folder(tmp_path / "one") / "adapter_model.safetensors")
        got = load_file(folder(tmp_path / "two") / "adapter_model.safetensors")
    else:
        expected = AutoModelForCausalLM.from_pretrained(folder(tmp_path / "one")).state_dict()
        got = AutoModelForCausalLM.from_pretrained(folder(tmp_path / "two")).state_dict()
    assert set(got) == set(expected) and expected
    lr = 0.1 if lora else 0.01
    for name, value in expected.items():
        # AdamW's first steps move every element by about lr whatever its gradient's size, so an element whose
        # gradient is float32 round-off moves by a part of lr: 1% of lr bounds that, a wrong gradient moves by lr
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-2 * lr), name


def test_bad_guidance_flags_are_one_line_and_write_nothing(capsys, workspace, tmp_path):
    base = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--out", tmp_path / "out", "--no-progress"]
    for extra, message in [(["--guidance", "instance", "--nproc", "2"], "one process only"),
                           (["--stop-when", "retain_ratio<-0.5"], "geffect_every"),
                           (["--stop-when", "loss<1", "--geffect-every", "1"], "unknown quantity"),
                           (["--guidance", "rectify", "--retain-objective", "kl"], "nll retain term")]:
        code = main([str(a) for a in [*base, *extra]])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "out").exists()
