"""Run folders under misuse: a crafted checkpoint is not executed, a rerun under other settings does not
resume silently, one writer per folder, nothing half-written or left over, settings refused before any file."""
import fcntl
import json
import os

import pytest
import torch

from geffect_kernels.train import (CheckpointError, ResumeMismatch, RunFolderBusy, TrainConfig, load_checkpoint,
                                   train, warmup_linear_decay)
from geffect_kernels.train.checkpoint import CHECKPOINT, save_checkpoint
from geffect_kernels.train.run_lock import LOCK
from test_train import config, model_of, setup  # noqa: F401  (setup is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: what a crafted checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_checkpoint_is_refused_not_executed(setup, tmp_path):
    tokenizer, forget, retain = setup
    marker = tmp_path / "code_ran"
    save_checkpoint(tmp_path / "run", {"step": 1, "model": {}, "payload": _RunsCode(marker)})
    torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)  # the way the loop used to load it: runs
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint.pt holds objects other than tensors.*not loaded"):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "run"))
    assert not marker.exists()


def test_a_truncated_or_foreign_checkpoint_is_named(setup, tmp_path):
    tokenizer, forget, retain = setup
    train(model_of(tokenizer), forget, retain, config(tmp_path / "a", steps=2))
    data = (tmp_path / "a" / CHECKPOINT).read_bytes()
    (tmp_path / "a" / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a/checkpoint.pt cannot be read"):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "a", steps=2))
    save_checkpoint(tmp_path / "b", {"model": {}})
    with pytest.raises(CheckpointError, match=r"b/checkpoint.pt is not a geffect checkpoint \(no step, optimizer"):
        load_checkpoint(tmp_path / "b")
    # --overwrite (resume=False) does not need to read it
    assert train(model_of(tokenizer), forget, retain, config(tmp_path / "a", steps=2), resume=False).resumed_from == 0


def test_other_settings_do_not_resume_silently(setup, tmp_path):
    tokenizer, forget, retain = setup
    train(model_of(tokenizer), forget, retain, config(tmp_path, steps=4, checkpoint_every=4))
    before = (tmp_path / "config.json").read_text()
    for changed, named in [({"steps": 6, "lr": 1e-2}, "lr: 0.001 -> 0.01; steps: 4 -> 6"),
                           ({"objective": "npo", "hparams": {"beta": 0.5}}, "hparams: {'beta': 0.1} -> {'beta': 0.5}"),
                           ({"batch_size": 3}, "batch_size: 4 -> 3")]:
        with pytest.raises(ResumeMismatch, match=r"checkpoint \(step 4\) was trained with other settings \("
                                                 + named.replace("{", r"\{").replace("}", r"\}") + r"\); pass "
                                                 r"--resume \(resume=True\).*--overwrite \(resume=False\)"):
            train(model_of(tokenizer), forget, retain, config(tmp_path, **{"steps": 4, **changed}))
    with pytest.raises(ResumeMismatch, match="forget_data: changed"):
        train(model_of(tokenizer), retain, retain, config(tmp_path, steps=4))
    with pytest.raises(ResumeMismatch, match=r"at step 4, past steps=2; pass --overwrite"):
        train(model_of(tokenizer), forget, retain, config(tmp_path, steps=2), resume=True)
    assert (tmp_path / "config.json").read_text() == before  # the refusals wrote nothing
    assert train(model_of(tokenizer), forget, retain, config(tmp_path, steps=4)).resumed_from == 4  # same: resumes


def test_extending_steps_continues_on_the_new_schedule(setup, tmp_path):
    tokenizer, forget, retain = setup
    short = train(model_of(tokenizer), forget, retain, config(tmp_path, steps=4, warmup_steps=1))
    longer = train(model_of(tokenizer), forget, retain, config(tmp_path, steps=7, warmup_steps=1), resume=True)
    assert longer.resumed_from == 4 and [m["step"] for m in longer.metrics] == list(range(1, 8))
    f4, f7 = warmup_linear_decay(1, 4), warmup_linear_decay(1, 7)
    assert [m["lr"] for m in longer.metrics[:4]] == [m["lr"] for m in short.metrics] == [1e-3 * f4(s) for s in range(4)]
    assert [m["lr"] for m in longer.metrics[4:]] == [1e-3 * f7(s) for s in range(4, 7)]
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["steps"] == 7 and recorded["setting_changes"] == [{"step": 4, "before": {"steps": 4}}]
    # killed and rerun under the extended settings: resumes without a question
    assert train(model_of(tokenizer), forget, retain, config(tmp_path, steps=7, warmup_steps=1)).resumed_from == 7


def test_overwrite_starts_over(setup, tmp_path):
    tokenizer, forget, retain = setup
    train(model_of(tokenizer), forget, retain, config(tmp_path, steps=2, lr=1e-2))
    sharded = tmp_path / "checkpoint"  # what a sharded run at another world size left: it goes too
    (sharded / "step-2").mkdir(parents=True)
    (sharded / "latest.json").write_text('{"step": 2, "world_size": 2}')
    again = train(model_of(tokenizer), forget, retain, config(tmp_path, steps=2), resume=False)
    assert again.resumed_from == 0 and [m["step"] for m in again.metrics] == [1, 2]
    assert not sharded.exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["lr"] for line in lines] == [m["lr"] for m in again.metrics]
    assert load_checkpoint(tmp_path)["settings"]["lr"] == 1e-3


def test_one_writer_per_run_folder(setup, tmp_path):
    tokenizer, forget, retain = setup
    tmp_path.mkdir(exist_ok=True)
    held = os.open(tmp_path / LOCK, os.O_RDWR | os.O_CREAT)
    os.write(held, b"pid 4242 on elsewhere since noon")
    fcntl.flock(held, fcntl.LOCK_EX)  # another process writing (flock is per open file, so this conflicts)
    try:
        with pytest.raises(RunFolderBusy, match=r"is in use by another run \(pid 4242 on elsewhere since noon\)"):
            train(model_of(tokenizer), forget, retain, config(tmp_path, steps=1))
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # the second writer touched nothing
    finally:
        os.close(held)
    # the holder died without cleaning up (kill -9): its lock file is stale and the next run proceeds
    train(model_of(tokenizer), forget, retain, config(tmp_path, steps=1))
    assert not (tmp_path / LOCK).exists()


def test_a_planted_lock_file_is_never_written_through(setup, tmp_path):
    tokenizer, forget, retain = setup
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).symlink_to(victim)
    with pytest.raises(ValueError, match=r"run/.lock is a symbolic link: refusing to use it"):
        train(model_of(tokenizer), forget, retain, config(run, steps=1))
    assert victim.read_text() == "precious" and sorted(p.name for p in run.iterdir()) == [LOCK]
    (run / LOCK).unlink()
    os.link(victim, run / LOCK)  # a hard link looks like a stale lock file: unlinked, never truncated
    train(model_of(tokenizer), forget, retain, config(run, steps=1))
    assert victim.read_text() == "precious" and not (run / LOCK).exists()


def test_a_killed_runs_temporary_files_are_removed(setup, tmp_path):
    tokenizer, forget, retain = setup
    train(model_of(tokenizer), forget, retain, config(tmp_path, steps=2))
    (tmp_path / f".{CHECKPOINT}.abc123_z.tmp").write_bytes(b"x" * 1000)  # killed inside the checkpoint write
    (tmp_path / ".metrics.jsonl.def45678.tmp").write_text("{")
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".notes.md.abcdefgh.tmp").write_text("someone's")  # not a name a run writes: not ours to remove
    train(model_of(tokenizer), forget, retain, config(tmp_path, steps=2))
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".notes.md.abcdefgh.tmp"]


@pytest.mark.parametrize("bad, message", [
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number ≥ 0"),
    ({"retain_weight": float("inf")}, "retain_weight must be a finite number ≥ 0, got inf"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm .* must be a finite number > 0"),
    ({"objective": "wga", "hparams": {"alpha": float("inf")}}, "alpha must be a finite number ≥ 0, got inf"),
    ({"objective": "wga", "hparams": {"alpha": -1.0}}, "alpha must be a finite number ≥ 0, got -1"),
    ({"objective": "npo", "hparams": {"beta": float("inf")}}, "beta must be a finite number > 0, got inf"),
    ({"objective": "simnpo", "hparams": {"delta": float("inf")}}, "delta must be a finite number, got inf"),
    ({"objective": "satimp", "hparams": {"gamma": -0.5}}, "gamma must be a finite number ≥ 0"),
    ({"objective": "ga", "hparams": {"alpha": 3.0}}, "takes no hyper-parameter alpha"),
    ({"hparams": "beta"}, "hparams must be a mapping"),
    ({"steps": True}, "steps must be a positive integer"),
    ({"geffect_groups": "block"}, "unknown geffect_groups"),
])
def test_out_of_range_settings_are_refused_when_the_config_is_made(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_nothing_is_written_before_the_inputs_are_checked(setup, tmp_path):
    tokenizer, forget, retain = setup
    with pytest.raises(RuntimeError, match="backend 'cpp_cuda' is not available"):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "run", backend="cpp_cuda"))
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "run", backend="bogus"))
    with pytest.raises(ValueError, match="needs a non-empty retain set"):
        train(model_of(tokenizer), forget, None, config(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
