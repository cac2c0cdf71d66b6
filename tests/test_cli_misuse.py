"""`geffect train` under misuse a careless user or a crafted file brings: each refused in one line, exit 1, with
nothing of anyone else's removed; Ctrl-C and SIGTERM are one line too."""
import json

import pytest

from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, *argv, code=1):
    got, _, err = run(capsys, *argv)
    assert got == code and err.startswith("geffect: ") and err.count("\n") == 1, (argv, got, err)
    return err


def train_argv(workspace, out, *extra):
    return ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--out", out, "--steps", 1, "--batch-size", 2, "--no-progress", *extra]


def test_yaml_of_the_wrong_shape_is_one_line(capsys, workspace, tmp_path):
    lines = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
                    for p, c in zip([None, *"abcdefgh"], "abcdefghi"))
    cases = {
        "bomb": (lines + "steps: *i\n", "expands to more than 10000 values (aliases): refused"),
        "recursive": ("a: &a [*a]\n", "expands to more than 10000 values"),
        "model_list": ("model: [1, 2]\n", "model must be a path, got [1, 2]"),
        "objective_map": ("objective: {ga: 1}\n", "objective must be a name or a list of names (ga, "),
        "objective_number": ("objective: [ga, 3]\n", "objective must be a name or a list of names (ga, "),
        "steps_text": ("steps: many\n", "steps must be a positive integer, got 'many'"),
        "lr_text": ("lr: 1e-3\n", "lr must be a finite number > 0, got '1e-3'"),  # YAML 1.1 reads this as text
        "groups_list": ("geffect_groups: [layer]\n", "geffect_groups must be text, got ['layer']"),
        "hparams_keys": ("hparams: {1: 2}\n", "hyper-parameter 1 is taken by none of the objectives"),
        "hparams_text": ("hparams: {beta: [1]}\nobjective: npo\n", "beta must be a finite number > 0, got [1]"),
        "not_utf8": (b"steps: \xff\n", "cannot read the YAML config"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        argv = ["train", "--config", path, "--out", tmp_path / "out", "--no-progress"]
        if not name.startswith("model"):
            argv += ["--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
                     workspace / "retain.json"]
        assert message in one_line_error(capsys, *argv), name
    assert not (tmp_path / "out").exists()


def test_flags_that_would_do_something_else_are_refused(capsys, workspace, tmp_path):
    out = tmp_path / "out"
    for extra, message in [(["--lora-r", 0], "--lora-r must be a positive integer, got 0"),
                           (["--lora-r", 2, "--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0"),
                           (["--lora-r", 2, "--lora-alpha", "-1"], "--lora-alpha must be a finite number > 0"),
                           (["--out", ""], "--out must name a folder, got an empty path")]:
        assert message in one_line_error(capsys, *train_argv(workspace, out, *extra)), extra
    assert not out.exists()


def test_answers_longer_than_learned_positions_are_refused(capsys, workspace, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=24, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    argv = train_argv(workspace, tmp_path / "out")
    argv[argv.index("--model") + 1] = tmp_path / "gpt2"
    err = one_line_error(capsys, *argv)
    assert "forget.json: an example (question and answer) has" in err and \
        "more than the model's 24 positions; pass --max-length 24" in err
    err = one_line_error(capsys, "profile", "--model", tmp_path / "gpt2", "--forget", workspace / "forget.json",
                         "--out", tmp_path / "p")
    assert "more than the model's 24 positions; shorten them" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p").exists()


def test_out_of_memory_is_one_line(capsys, workspace, tmp_path, monkeypatch):
    from geffect_kernels.train import loop

    def no_memory(run, evaluate=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 123456789012 bytes.")

    monkeypatch.setattr(loop, "run_steps", no_memory)
    err = one_line_error(capsys, *train_argv(workspace, tmp_path / "out"))
    assert err.startswith("geffect: error: out of memory (") and "lower --batch-size or --max-length" in err


def test_an_adapter_that_is_its_own_base_is_refused(capsys, workspace, tmp_path):
    loop = [tmp_path / "a", tmp_path / "b"]
    for here, base in zip(loop, loop[::-1]):
        here.mkdir()
        (here / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path":
                                                                       str(tmp_path / "self")}))
    for model in (loop[0], tmp_path / "self"):
        err = one_line_error(capsys, "profile", "--model", model, "--forget", workspace / "forget.json", "--out",
                             tmp_path / "p")
        assert "LoRA adapters whose base models lead back to themselves" in err, err


def test_ctrl_c_is_one_line(capsys, workspace, tmp_path, monkeypatch):
    from geffect_kernels.train import loop

    def interrupted(run, evaluate=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_steps", interrupted)
    err = one_line_error(capsys, *train_argv(workspace, tmp_path / "out"), code=130)
    assert err.startswith("geffect: stopped by Ctrl-C (SIGINT); a run folder keeps its last checkpoint")
    assert not (tmp_path / "out" / "runs" / "ga" / ".lock").exists()


def test_overwrite_removes_only_what_a_run_wrote(capsys, workspace, tmp_path):
    out = tmp_path / "out"
    strangers = out / "runs" / "ga"
    (strangers / "model").mkdir(parents=True)
    (strangers / "model" / "weights.bin").write_text("someone's")
    for argv in (train_argv(workspace, out), train_argv(workspace, out, "--overwrite"),
                 train_argv(workspace, out, "--overwrite", "--nproc", 2)):  # refused before torchrun starts
        err = one_line_error(capsys, *argv)
        assert "runs/ga holds a model/ that no geffect run wrote there" in err
    assert (strangers / "model" / "weights.bin").read_text() == "someone's"

    (strangers / "model" / "weights.bin").unlink()
    (strangers / "model").rmdir()
    (strangers / ".notes.tmp").write_text("someone's")  # not a name a run writes
    (strangers / ".checkpoint.pt.k2j4h5g6.tmp").write_text("a killed run's")
    (out / "results").mkdir()
    (out / "results" / "summary.json").write_text(json.dumps({"ga": {"forget_probability": 0.9},
                                                              "someone": {"forget_probability": 0.1}}))
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, *train_argv(workspace, out, *extra))
        assert code == 0, err
    assert (strangers / ".notes.tmp").read_text() == "someone's"
    assert not (strangers / ".checkpoint.pt.k2j4h5g6.tmp").exists()
    assert not (out / "results" / "summary.json").exists()  # ga's row described the old model, someone's no run
    assert "someone" not in (out / "report.md").read_text()
