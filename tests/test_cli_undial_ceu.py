"""`geffect train --objective ceu undial`: a short run of each through the loop, G-effects every step."""
import json

import pytest

from test_cli import make_workspace, run

pytestmark = pytest.mark.usefixtures("one_thread")
OBJECTIVES = ["ceu", "undial"]


def test_train_runs_ceu_and_undial_with_geffects(capsys, tmp_path):
    w = make_workspace(tmp_path / "ws")
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", w / "model", "--forget", w / "forget.json", "--retain",
                       w / "retain.json", "--objective", *OBJECTIVES, "--steps", 2, "--batch-size", 2, "--lr", 1e-3,
                       "--geffect-every", 1, "--out", out, "--no-progress")
    assert code == 0, err
    for name in OBJECTIVES:
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        assert all(isinstance(m["e_forget"], float) and isinstance(m["e_retain"], float) for m in metrics)
