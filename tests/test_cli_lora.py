"""`geffect train --lora-r`: adapters train, only the adapter is saved, and `profile` takes the adapter folder."""
import json

import pytest

from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_train_saves_the_adapter_and_profile_reads_it(capsys, workspace, tmp_path):
    m, f, r = workspace / "model", workspace / "forget.json", workspace / "retain.json"
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", m, "--forget", f, "--retain", r, "--objective", "npo",
                       "--steps", 3, "--lr", 0.01, "--batch-size", 4, "--geffect-every", 1, "--lora-r", 4,
                       "--lora-alpha", 8, "--lora-targets", "q_proj,v_proj", "--out", out, "--no-progress")
    assert code == 0, err
    saved = out / "runs" / "npo" / "model"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    geffects = json.loads((out / "runs" / "npo" / "geffects.json").read_text())["records"]
    assert {g for g in geffects[0]["by_group"]} == {"layer.0", "layer.1"}  # adapters only, named by layer
    metrics = [json.loads(line) for line in (out / "runs" / "npo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] != metrics[0]["loss"]  # the adapters moved

    code, stdout, err = run(capsys, "profile", "--model", saved, "--forget", f, "--retain", r, "--objective", "ga",
                            "--samples", 4, "--groups", "component", "--out", tmp_path / "prof")
    assert code == 0, err
    rows = (tmp_path / "prof" / "profile.csv").read_text().splitlines()
    assert any(row.startswith("ga,layer.1.self_attn.v_proj.lora_B.default,retain,") for row in rows)
    assert not any("mlp" in row or "embed" in row for row in rows)  # frozen weights are not profiled


def test_lora_targets_matching_nothing_is_one_line_and_writes_nothing(capsys, workspace, tmp_path):
    m, f, r = workspace / "model", workspace / "forget.json", workspace / "retain.json"
    code, _, err = run(capsys, "train", "--model", m, "--forget", f, "--retain", r, "--lora-r", 4,
                       "--lora-targets", "q_proj,qkv", "--out", tmp_path / "run", "--no-progress")
    assert code == 1 and err.startswith("geffect: error: LoRA target(s) qkv match no module") and err.count("\n") == 1
    assert "q_proj" in err and not (tmp_path / "run").exists()
