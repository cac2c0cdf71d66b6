"""`geffect train` on two gloo ranks (FSDP2): the losses and G-effects of one process, a run killed under torchrun
resumes bit-identically, and bad input (too many processes, another world size) is one line with nothing written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from geffect_kernels.cli import main
from geffect_kernels.train import launch

from ranks import ROOT, rank_env, run_ranks
from test_cli import make_workspace, write_run_yaml

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 600  # a hang, not a slow machine: CI shares its cores


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("dist"))
    return write_run_yaml(root, objective="npo", steps=6, lr=0.01, batch_size=5, geffect_every=2, checkpoint_every=2,
                          backend="torch")


def train_args(workspace, out):
    return ["train", "--config", workspace / "run.yaml", "--out", out, "--no-progress"]


def metrics(out, objective="npo"):
    return [json.loads(line) for line in (out / "runs" / objective / "metrics.jsonl").read_text().splitlines()]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def two_ranks(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    run_ranks(["-m", "geffect_kernels", *train_args(workspace, out)], world=2, timeout=TIMEOUT)
    return out


def test_two_ranks_log_the_losses_and_geffects_of_one_process(capsys, workspace, two_ranks, tmp_path):
    code, err = run_cli(capsys, *train_args(workspace, tmp_path / "one"))
    assert code == 0, err
    one, two = metrics(tmp_path / "one"), metrics(two_ranks)
    assert [m["step"] for m in two] == list(range(1, 7))
    for a, b in zip(one, two):
        for key in ("loss", "forget_loss", "retain_loss", "grad_norm", "e_forget", "e_retain"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5), (a["step"], key)
    assert one[-1]["loss"] != one[0]["loss"]
    history = json.loads((two_ranks / "runs" / "npo" / "geffects.json").read_text())["records"]
    assert [r["step"] for r in history] == [1, 3, 5] and set(history[0]["by_group"]) >= {"layer.0", "layer.1"}
    weights = lambda run: AutoModelForCausalLM.from_pretrained(run / "runs" / "npo" / "model").state_dict()
    expected, got = weights(tmp_path / "one"), weights(two_ranks)  # saved a block at a time, read back whole
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-6), name
    saved = sorted(p.name for p in (two_ranks / "runs" / "npo" / "model").glob("model-*.safetensors"))
    assert saved == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 2 blocks, then the root


def test_lora_with_a_kl_retain_term_trains_and_evaluates_as_one_process(capsys, workspace, tmp_path):
    # the adapters are drawn on the CPU from the seed, the KL reference is the model with its adapters disabled, and
    # --eval runs on every rank (greedy generation in lockstep), rank 0 writing the summary
    lora = ["--objective", "ga", "--retain-objective", "kl", "--lora-r", 2, "--lora-targets", "q_proj,down_proj",
            "--steps", 3, "--lr", 0.1, "--geffect-every", 0, "--eval", "--max-new-tokens", 4]
    run_ranks(["-m", "geffect_kernels", *train_args(workspace, tmp_path / "two"), *lora], world=2, timeout=TIMEOUT)
    code, err = run_cli(capsys, *train_args(workspace, tmp_path / "one"), *lora)
    assert code == 0, err
    one, two = metrics(tmp_path / "one", "ga"), metrics(tmp_path / "two", "ga")
    assert len(two) == 3 and one[-1]["retain_loss"] > 1e-5
    for a, b in zip(one, two):
        for key in ("loss", "forget_loss", "retain_loss", "grad_norm"):  # KL: a difference of close log-probs
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), (a["step"], key)
    adapter = lambda run: load_file(run / "runs" / "ga" / "model" / "adapter_model.safetensors")
    expected, got = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert set(got) == set(expected) and len(got) == 8
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-6), name
    summary = lambda run: json.loads((run / "results" / "summary.json").read_text())["ga"]
    expected, got = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert set(got) == set(expected) and "forget_rouge_l" in got
    for key, value in expected.items():  # numbers, and the reasons (a mapping of strings) for what is missing
        assert got[key] == (value if isinstance(value, dict) else pytest.approx(value, rel=1e-4, abs=1e-7)), key


def test_killed_run_resumes_bit_identically_under_torchrun(workspace, two_ranks, tmp_path):
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--log-dir", str(logs), "--redirects", "3", "-m", "geffect_kernels",
               *map(str, train_args(workspace, out))]
    latest = out / "runs" / "npo" / "checkpoint" / "latest.json"
    proc = subprocess.Popen(command, env=rank_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-run
        _, err = proc.communicate()
    assert latest.is_file(), f"no checkpoint before the kill (exit {proc.returncode}):\n{_rank_logs(logs, err)}"
    assert len(metrics(out)) < 6 and not (out / "runs" / "npo" / "model").exists(), "the run ended before the kill"
    resumed = subprocess.run([sys.executable, "-m", "geffect_kernels", *map(str, train_args(workspace, out)),
                              "--nproc", "2"], env=rank_env(), cwd=ROOT, capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout and "resumed from step 0" not in resumed.stdout
    untimed = lambda run: [{k: v for k, v in m.items() if k != "seconds"} for m in metrics(run)]
    assert untimed(out) == untimed(two_ranks)
    model = lambda run: {p.name: p.read_bytes() for p in (run / "runs" / "npo" / "model").glob("model*")}
    assert model(out) == model(two_ranks) and len(model(out)) == 4
    geffects = lambda run: json.loads((run / "runs" / "npo" / "geffects.json").read_text())
    assert geffects(out) == geffects(two_ranks)


def test_too_many_processes_and_another_world_size_are_one_line_errors(capsys, workspace, two_ranks, tmp_path):
    code, err = run_cli(capsys, *train_args(workspace, tmp_path / "run"), "--nproc", 6)
    assert code == 1 and err.count("\n") == 1 and "6 processes but a global batch holds 5 samples" in err
    assert not (tmp_path / "run").exists()
    before = {p: p.read_bytes() for p in two_ranks.rglob("*") if p.is_file()}
    for extra in ([], ["--nproc", 3], ["--allow-reshard"]):
        code, err = run_cli(capsys, *train_args(workspace, two_ranks), *extra)
        assert code == 1 and err.count("\n") == 1, (extra, err)
        assert "written by 2 process(es)" in err or "between one process and several" in err, err
    # (--allow-reshard lets 2 -> 3 ranks through; 2 -> 1 never: one process keeps a single-file checkpoint)
    assert {p: p.read_bytes() for p in two_ranks.rglob("*") if p.is_file()} == before


def test_overwrite_launches_at_any_world_size(workspace, two_ranks, monkeypatch):
    # the checkpoint is to be replaced: who wrote it does not matter (the ranks start over: test_distributed_loop)
    launched = []
    monkeypatch.setattr(launch, "launch", lambda argv, nproc: launched.append((argv, nproc)) or 0)
    before = {p: p.read_bytes() for p in two_ranks.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in train_args(workspace, two_ranks)] + ["--nproc", "3", "--overwrite"])
    assert stop.value.code == 0 and len(launched) == 1
    assert launched[0][1] == 3 and "--overwrite" in launched[0][0]
    assert {p: p.read_bytes() for p in two_ranks.rglob("*") if p.is_file()} == before


def test_a_model_folder_the_ranks_cannot_read_into_shards_is_a_one_line_error(capsys, workspace, tmp_path):
    pickled = tmp_path / "pickled"  # weights without safetensors: no slice of them can be read alone
    shutil.copytree(workspace / "model", pickled)
    (pickled / "model.safetensors").unlink()
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "model", adapter)
    (adapter / "adapter_config.json").write_text("{}")
    for model, message in ((pickled, "holds no safetensors weights"), (adapter, "is a LoRA adapter")):
        code, err = run_cli(capsys, *train_args(workspace, tmp_path / "run"), "--model", model, "--nproc", 2)
        assert code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def _rank_logs(logs, launcher_err):
    """Each rank's captured stderr (torchrun --redirects), else the launcher's."""
    found = sorted(logs.rglob("stderr.log"))
    text = "\n".join(f"--- {path.parent.name}:\n{path.read_text()[-2000:]}" for path in found)
    return text or launcher_err[-3000:]

