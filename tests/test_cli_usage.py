"""What a newcomer meets first: help that starts at once and shows the defaults, a bad flag as one line with
exit 1, run messages that say only what happened, --eval's generation within the model's positions, plots whose
words match their colours, and a warning on a quick demo's undecidable observations."""
import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

import geffect_kernels
from geffect_kernels import cli
from geffect_kernels.catalog import OBJECTIVES
from geffect_kernels.eval.likelihood import greedy_answers
from geffect_kernels.eval.report import quick_note
from geffect_kernels.eval.tofu import MAX_NEW_TOKENS
from geffect_kernels.geffect import plot
from geffect_kernels.train import TrainConfig, tiny_llama
from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)

HEAVY = ("torch", "transformers")
# runs `main(argv)` in a fresh interpreter and prints its exit code and which heavy modules it imported
PROBE = """
import json, sys
from geffect_kernels.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def probe(*argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.splitlines()[-1]), done.stdout, done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["profile", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    result, out, err = probe(*argv)
    assert result == {"code": 0, "heavy": []}, err
    assert "usage: geffect" in out


def test_an_unknown_objective_is_one_line_and_exit_1_before_any_heavy_import():
    result, out, err = probe("train", "--objective", "foo")
    assert result == {"code": 1, "heavy": []}
    assert err.count("\n") == 1 and err.startswith("geffect: error: argument --objective: invalid choice: 'foo'")
    assert "usage:" not in out + err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["profile", "--forget", "f.json"], "the following arguments are required: --model"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_every_bad_flag_is_one_line_and_exit_1(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and err.startswith("geffect: error:") and message in err and err.count("\n") == 1, err
    assert out == ""


def test_an_unknown_objective_in_a_config_file_is_one_line(capsys, workspace, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {workspace / 'model'}\nforget: {workspace / 'forget.json'}\nobjective: foo\n"
                      f"retain_objective: none\n")
    code, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "out")
    assert code == 1 and "unknown objective 'foo'; choose from ga" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def help_blocks(text):
    """``{"--steps": "optimizer steps (default: 30)", ...}`` from an argparse help text."""
    blocks = {}
    for block in re.split(r"\n  (?=-)", text):
        flag, _, rest = block.strip().partition(" ")
        blocks[flag.rstrip(",")] = " ".join(rest.split())
    return blocks


def test_train_help_shows_trainconfigs_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    blocks = help_blocks(capsys.readouterr().out)
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in cli.TRAIN_DEFAULTS:
        shown = re.search(r"\(default: ([^)]+)\)", blocks["--" + key.replace("_", "-")])
        assert shown, f"--{key} shows no default"
        value = shown[1]
        assert (float(value) if isinstance(fields[key], (int, float)) else value) == fields[key], key
    assert "(default: 200" in blocks["--max-new-tokens"] and cli.MAX_NEW_TOKENS == MAX_NEW_TOKENS


def test_the_clis_objective_names_are_the_catalogs():
    assert list(cli.OBJECTIVE_NAMES) == list(OBJECTIVES)


def test_the_package_exports_agree_and_resolve():
    source = Path(geffect_kernels.__file__).read_text()
    guarded = next(node for node in ast.parse(source).body
                   if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING")
    typed = {alias.name: "." * node.level + (f"{node.module}" if node.module else alias.name)
             for node in guarded.body for alias in node.names}
    assert typed == geffect_kernels._EXPORTS
    assert sorted(geffect_kernels.__all__) == sorted(geffect_kernels._EXPORTS)
    for name in geffect_kernels.__all__:
        assert getattr(geffect_kernels, name) is not None
    with pytest.raises(AttributeError):
        geffect_kernels.no_such_name  # noqa: B018


def test_a_fresh_run_does_not_say_resumed_and_a_rerun_says_from_where(capsys, workspace, tmp_path):
    argv = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--steps", 1, "--batch-size", 2, "--out", tmp_path, "--no-progress"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "ga: 1 steps, final loss" in out and "resumed" not in out
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "ga: 1 steps (resumed from step 1), final loss" in out


def test_eval_notes_when_the_model_has_fewer_positions_than_new_tokens(capsys, workspace, tmp_path):
    limit = json.loads((workspace / "model" / "config.json").read_text())["max_position_embeddings"]
    code, out, err = run(capsys, "train", "--model", workspace / "model", "--forget", workspace / "forget.json",
                         "--retain", workspace / "retain.json", "--steps", 1, "--batch-size", 2, "--eval",
                         "--max-new-tokens", limit + 1, "--out", tmp_path, "--no-progress")
    assert code == 0, err
    assert f"note: --eval generates up to {limit + 1} new tokens, but the model has {limit} positions" in out


class _Tokenizer:
    """Just what greedy_answers and tiny_llama read: pad id, no EOS (every answer runs as long as it may),
    decoding that shows one word per token."""
    pad_token_id, eos_token_id, bos_token_id = 0, None, 2

    def __len__(self):
        return 50

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join("t" for _ in row) for row in rows.tolist()]


def test_greedy_answers_stop_at_the_models_last_position(monkeypatch):
    from geffect_kernels.eval import likelihood

    monkeypatch.setattr(likelihood, "prompt_ids", lambda tok, q: [2] + [3 + ord(c) % 40 for c in q])
    tokenizer = _Tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=16, seed=3)
    questions = ["abcde", "xyz"]  # prompts of 6 and 4 tokens: the batch is 6 wide
    answers = greedy_answers(model, tokenizer, questions, max_new_tokens=100)
    assert [len(a.split()) for a in answers] == [16 - 6] * 2
    assert [len(a.split()) for a in greedy_answers(model, tokenizer, questions, max_new_tokens=3)] == [3, 3]
    assert greedy_answers(model, tokenizer, ["a" * 14], max_new_tokens=100) == ["t"]  # 15 + 1 positions
    assert greedy_answers(model, tokenizer, ["a" * 15], max_new_tokens=100) == [""]  # the prompt fills all 16


def test_heatmap_title_names_the_colour_the_colormap_gives_negative_values():
    low = matplotlib.colormaps[plot.HEATMAP_COLOURS](0.0)  # vmin = -limit
    high = matplotlib.colormaps[plot.HEATMAP_COLOURS](1.0)
    assert low[0] > low[2] and high[2] > high[0]  # red below 0, blue above
    assert "red < 0" in plot.HEATMAP_TITLE and "blue" not in plot.HEATMAP_TITLE


def test_symlog_threshold_is_a_power_of_ten_a_tenth_below_the_smallest_curve():
    assert plot.symlog_threshold([[-1.0, -1000.0], [0.2, -0.5]]) == pytest.approx(0.01)
    assert plot.symlog_threshold([[3.0, 7.0]]) == pytest.approx(0.1)
    assert plot.symlog_threshold([[0.0, 0.0], [5.0]]) == pytest.approx(0.1)  # an all-zero curve is ignored
    assert plot.symlog_threshold([[0.0], []]) is None


def test_a_quick_demo_folder_warns_about_observations_b_and_c(tmp_path):
    settings = {"quick": True, "layers": 3, "unlearn_steps": 12, "seeds": 1}
    (tmp_path / "demo_settings.json").write_text(json.dumps(settings))
    note = quick_note(tmp_path)
    assert "too small to decide (b) and (c)" in note and "1 shallow with 1 deep" in note
    (tmp_path / "demo_settings.json").write_text(json.dumps({**settings, "quick": False}))
    assert quick_note(tmp_path) is None
    assert quick_note(tmp_path / "elsewhere") is None
