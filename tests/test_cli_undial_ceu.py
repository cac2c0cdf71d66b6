"""`geffect train --objective ceu undial`: a short run of each through the loop, G-effects every step; `geffect
profile` of both (UNDIAL reads the --reference model's logits)."""
import json

import pytest

from test_cli import make_workspace, run

pytestmark = pytest.mark.usefixtures("one_thread")
OBJECTIVES = ["ceu", "undial"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_train_runs_ceu_and_undial_with_geffects(capsys, workspace, tmp_path):
    w = workspace
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", w / "model", "--forget", w / "forget.json", "--retain",
                       w / "retain.json", "--objective", *OBJECTIVES, "--steps", 2, "--batch-size", 2, "--lr", 1e-3,
                       "--geffect-every", 1, "--out", out, "--no-progress")
    assert code == 0, err
    for name in OBJECTIVES:
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        assert all(isinstance(m["e_forget"], float) and isinstance(m["e_retain"], float) for m in metrics)


def test_profile_ceu_and_undial(capsys, workspace, tmp_path):
    w = workspace
    common = ["profile", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
              "--samples", 3]
    code, _, err = run(capsys, *common, "--objective", "undial", "--out", tmp_path / "refused")
    assert code == 1 and "needs the reference model's distribution: pass --reference" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()
    code, _, err = run(capsys, *common, "--objective", "ceu", "undial", "--reference", w / "model", "--hparam",
                       "beta=3", "--out", tmp_path / "prof")
    assert code == 0, err
    rows = (tmp_path / "prof" / "profile.csv").read_text().splitlines()
    assert any(r.startswith("ceu,layer.1,forget,") for r in rows) and any(r.startswith("undial,layer.1,retain,")
                                                                          for r in rows)
