"""`geffect` under misuse: each class of failure is one line naming the file or flag at fault, exit 1, nothing
created; --debug (or GEFFECT_DEBUG=1) adds the traceback; reruns under other settings are refused."""
import json
import pickle

import pytest

from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 1 and err.startswith("geffect: error:") and err.count("\n") == 1, (argv, err)
    return err


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def broken_models(workspace, tmp_path_factory):
    """Model folders whose config is fine and whose weights are not: truncated, garbage, pickled code."""
    root = tmp_path_factory.mktemp("broken")
    weights = (workspace / "model" / "model.safetensors").read_bytes()
    for name, content in [("truncated", weights[: len(weights) // 2]), ("garbage", b"\x00" * 100)]:
        (root / name).mkdir()
        for f in (workspace / "model").iterdir():
            if f.name != "model.safetensors":
                (root / name / f.name).write_bytes(f.read_bytes())
        (root / name / "model.safetensors").write_bytes(content)
    (root / "pickled").mkdir()
    (root / "pickled" / "config.json").write_bytes((workspace / "model" / "config.json").read_bytes())
    (root / "pickled" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _RunsCode(root / "code_ran")}))
    return root


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the crafted .bin, refused by torch.load
def test_every_failure_class_is_one_line_and_creates_nothing(capsys, workspace, broken_models, tmp_path,
                                                            monkeypatch):
    m, f, r = workspace / "model", workspace / "forget.json", workspace / "retain.json"
    out = tmp_path / "out"
    (tmp_path / "a_file").write_text("")
    (tmp_path / "latin1.json").write_bytes('[{"question": "caf\xe9?", "answer": "oui"}]'.encode("latin-1"))
    (tmp_path / "inf.yaml").write_text(f"model: {m}\nforget: {f}\nretain: {r}\nlr: .inf\n")
    (tmp_path / "hp.yaml").write_text(f"model: {m}\nforget: {f}\nretain: {r}\nobjective: npo\nhparams: beta\n")
    train = ["train", "--forget", f, "--retain", r, "--out", out, "--steps", 1, "--no-progress"]
    cases = [
        (["train", "--model", broken_models / "truncated", *train[1:]], "truncated does not hold a loadable causal"),
        (["train", "--model", broken_models / "garbage", *train[1:]], "garbage does not hold a loadable causal"),
        (["train", "--model", broken_models / "pickled", *train[1:]], "pickled does not hold a loadable causal"),
        (["profile", "--model", broken_models / "truncated", "--forget", f, "--out", out],
         "truncated does not hold a loadable causal"),
        ([*train, "--model", m, "--device", "bogus"], "--device bogus: not usable here"),
        ([*train, "--model", m, "--device", "cuda:7"], "--device cuda:7: not usable here"),
        ([*train[:5], "--out", tmp_path / "a_file", "--model", m], "a_file is a file, not a folder"),
        ([*train[:5], "--out", tmp_path / "a_file" / "run", "--model", m], "a_file is a file, not a folder"),
        (["demo", "--quick", "--out", tmp_path / "a_file" / "demo"], "a_file is a file, not a folder"),
        (["profile", "--model", m, "--forget", f, "--out", tmp_path / "a_file"], "a_file is a file, not a folder"),
        ([*train, "--model", m, "--lr", "inf"], "lr must be a finite number > 0, got inf"),
        (["train", "--config", tmp_path / "inf.yaml", "--out", out], "lr must be a finite number > 0, got inf"),
        (["train", "--config", tmp_path / "hp.yaml", "--out", out], "hparams must be a mapping NAME: NUMBER"),
        ([*train, "--model", m, "--objective", "npo", "--hparam", "beta=inf"],
         "beta must be a finite number > 0, got inf"),
        ([*train, "--model", m, "--objective", "ga", "--hparam", "alpha=3"], "'alpha' is taken by none"),
        (["profile", "--model", m, "--forget", f, "--objective", "ga", "--hparam", "alpha=3", "--out", out],
         "'alpha' is taken by none"),
        (["profile", "--model", m, "--forget", f, "--samples", -1, "--out", out], "--samples must be a positive"),
        ([*train, "--forget", tmp_path / "latin1.json", "--model", m], "latin1.json: not UTF-8 text"),
    ]
    for argv, message in cases:
        err = one_line_error(capsys, *argv)
        assert message in err, (argv, err)
    monkeypatch.setenv("GEFFECT_BACKEND", "cpp_cuda")  # no such backend on a CPU
    err = one_line_error(capsys, *train, "--model", m)
    assert "GEFFECT_BACKEND=cpp_cuda: backend 'cpp_cuda' is not available" in err
    assert not out.exists() and not (broken_models / "code_ran").exists()


def test_debug_shows_the_traceback(capsys, workspace, tmp_path, monkeypatch):
    argv = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--out", tmp_path, "--lr", "inf"]
    code, _, err = run(capsys, *argv, "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "geffect: error: lr must be a finite number > 0, got inf"
    monkeypatch.setenv("GEFFECT_DEBUG", "1")
    assert "Traceback" in run(capsys, *argv)[2]


def test_rerun_under_other_settings_asks_for_resume_or_overwrite(capsys, workspace, tmp_path):
    argv = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--out", tmp_path, "--batch-size", 4, "--lr", "1e-3", "--no-progress",
            "--objective", "ga", "npo"]
    assert run(capsys, *argv, "--steps", 2)[0] == 0
    err = one_line_error(capsys, *argv, "--steps", 3)
    assert "runs/ga: its checkpoint (step 2) was trained with other settings (steps: 2 -> 3)" in err
    assert "--resume" in err and "--overwrite" in err
    assert json.loads((tmp_path / "runs" / "npo" / "config.json").read_text())["steps"] == 2  # checked first
    code, out, err = run(capsys, *argv, "--steps", 3, "--resume")
    assert code == 0 and "ga: 3 steps (resumed from step 2)" in out, err
    code, out, err = run(capsys, *argv, "--steps", 3, "--lr", "2e-3", "--overwrite")
    assert code == 0 and "npo: 3 steps, final loss" in out and "resumed" not in out, err
    preset = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
              workspace / "retain.json", "--out", tmp_path / "official", "--preset", "official", "--no-progress"]
    assert run(capsys, *preset)[0] == 0
    code, out, err = run(capsys, *preset)  # settings the preset derives from the model and data agree again
    assert code == 0 and "(resumed from step" in out and "(resumed from step 0)" not in out, err
    (tmp_path / "runs" / "ga" / "geffects.json").write_text("{not json")
    assert "ga/geffects.json: not a G-effect history" in one_line_error(capsys, "report", tmp_path)
