"""The `geffect` command: --help everywhere, one-line errors with a non-zero exit, and a tiny train -> report."""
import json

import pytest

from geffect_kernels.cli import main
from geffect_kernels.data import save_qa
from geffect_kernels.train import tiny_llama
from demo_cases import tiny_demo


pytestmark = pytest.mark.usefixtures("one_thread")


def make_workspace(root):
    """A tiny model folder and TOFU files under ``root`` (the CLI tests' shared inputs)."""
    data, tokenizer = tiny_demo()
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_qa(data.forget, root / "forget.json")
    save_qa(data.retain, root / "retain.json")
    save_qa(data.real_authors[:4], root / "real_authors.json")
    save_qa(data.world[:4], root / "world.json")
    return root


def write_run_yaml(root, **settings):
    """``root/run.yaml``: the workspace's model and files, then ``settings`` (the several-process tests' runs)."""
    lines = [f"model: {root / 'model'}", f"forget: {root / 'forget.json'}", f"retain: {root / 'retain.json'}",
             *(f"{key}: {value}" for key, value in settings.items())]
    (root / "run.yaml").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli"))


def test_train_eval_gives_tofus_model_utility_with_all_three_utility_sets(capsys, workspace, tmp_path):
    w = workspace
    common = ["train", "--model", w / "model", "--forget", w / "forget.json", "--retain", w / "retain.json",
              "--steps", 1, "--batch-size", 2, "--eval", "--max-new-tokens", 3, "--no-progress"]
    code, _, err = run(capsys, *common, "--real-authors", w / "real_authors.json", "--world", w / "world.json",
                       "--out", tmp_path / "full")
    assert code == 0, err
    summary = json.loads((tmp_path / "full" / "results" / "summary.json").read_text())["ga"]
    assert "model_utility" in summary and "real_authors_rouge_l" in summary and "world_truth" in summary
    header = (tmp_path / "full" / "results" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"model_utility", "real_authors_probability", "real_authors_rouge_l", "world_truth"} <= set(header)
    code, _, err = run(capsys, *common, "--out", tmp_path / "retain_only")
    assert code == 0, err
    summary = json.loads((tmp_path / "retain_only" / "results" / "summary.json").read_text())["ga"]
    assert "model_utility" not in summary and "retain_utility" in summary  # three numbers: not TOFU's utility


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["profile"], ["report"], ["build"]])
def test_help_on_every_command(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: geffect" in capsys.readouterr().out


def test_bad_input_gives_one_line_and_non_zero_exit(capsys, workspace, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "nofield.json").write_text('[{"question": "Q?"}]')
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    m, f, r = workspace / "model", workspace / "forget.json", workspace / "retain.json"
    cases = [
        (["train", "--model", m, "--forget", tmp_path / "missing.json", "--retain", r], "no such file"),
        (["train", "--model", m, "--forget", tmp_path / "empty.json", "--retain", r], "contains no records"),
        (["train", "--model", m, "--forget", tmp_path / "nofield.json", "--retain", r], "field 'answer' is missing"),
        (["train", "--model", tmp_path, "--forget", f, "--retain", r], "not a Hugging Face model directory"),
        (["train", "--model", tmp_path / "notmodel", "--forget", f, "--retain", r], "causal language model"),
        (["train", "--model", m, "--forget", f], "--retain FILE is required"),
        (["train", "--forget", f, "--retain", r], "--model is required"),
        (["train", "--model", m, "--forget", f, "--retain", r, "--steps", "0"], "steps must be a positive"),
        (["train", "--model", m, "--forget", f, "--retain", r, "--hparam", "beta"], "NAME=NUMBER"),
        (["train", "--model", m, "--forget", f, "--retain", r, "--preset", "paper"],
         "unknown preset 'paper'; valid: official"),
        (["train", "--model", m, "--forget", f, "--retain", r, "--eval", "--max-new-tokens", "0"],
         "--max-new-tokens must be a positive integer, got 0"),
        (["profile", "--model", m, "--forget", f, "--objective", "npo"], "needs reference log-probabilities"),
        (["report", tmp_path], "not a geffect run folder"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code != 0 and message in err and err.startswith("geffect: error:"), (argv, err)
        assert err.count("\n") == 1, err
    assert not (tmp_path / "geffect-run").exists()


def test_demo_seeds_must_be_positive(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--quick", "--seeds", "0", "--out", tmp_path / "d")
    assert code == 1 and err == "geffect: error: seeds must be a positive integer, got 0\n"
    assert not (tmp_path / "d").exists()


def test_demo_refuses_a_foreign_non_empty_folder(capsys, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = run(capsys, "demo", "--quick", "--out", tmp_path)
    assert code == 1 and "not empty" in err and (tmp_path / "precious.txt").read_text() == "keep me"


def test_train_profile_and_report_end_to_end(capsys, workspace, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {workspace / 'model'}\nforget: {workspace / 'forget.json'}\n"
                      f"retain: {workspace / 'retain.json'}\nobjective: [ga, tnpo]\nsteps: 2\nlr: 0.001\n"
                      f"batch_size: 4\ngeffect_every: 1\n")
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--config", config, "--out", out, "--steps", 3, "--no-progress")
    assert code == 0, err
    for name in ("ga", "tnpo"):
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]  # the flag overrides the YAML's steps
        assert (out / "runs" / name / "model" / "tokenizer.json").is_file()
    report = (out / "report.md").read_text()
    assert "| ga | 1 | 3 |" in report and "| tnpo | 1 | 3 |" in report  # objective, seeds, recorded steps
    assert (out / "plots" / "cumulative_geffects.png").is_file()
    # the observations these runs can decide, each ending in its verdict
    for letter in "abc":
        line = next(x for x in report.splitlines() if x.startswith(f"- ({letter})"))
        assert line.endswith(("— holds.", "— does not hold.")), line
    (out / "report.md").unlink()
    code, stdout, _ = run(capsys, "report", out)
    assert code == 0 and (out / "report.md").read_text() == report

    code, stdout, err = run(capsys, "profile", "--model", workspace / "model", "--forget", workspace / "forget.json",
                            "--retain", workspace / "retain.json", "--objective", "ga", "wtnpo", "--reference",
                            workspace / "model", "--samples", 4, "--out", tmp_path / "prof")
    assert code == 0, err
    rows = (tmp_path / "prof" / "profile.csv").read_text().splitlines()
    assert rows[0] == "objective,group,risk,value" and any(r.startswith("wtnpo,layer.1,retain,") for r in rows)
    assert "ga" in stdout and (tmp_path / "prof" / "profile.png").is_file()
