"""What ``geffect train --nproc`` says when its ranks fail, from their logs: a rank's one ``geffect:`` line, else
the exception that ended the first failing rank and its log, the only case the logs are kept."""
from geffect_kernels.train.launch import failure_line


def rank_logs(root, texts):
    for rank, text in texts.items():
        folder = root / "run_id" / "attempt_0" / str(rank)
        folder.mkdir(parents=True)
        (folder / "stderr.log").write_text(text)
    return root


def test_a_ranks_one_line_is_said_and_the_logs_removed(tmp_path):
    logs = rank_logs(tmp_path / "logs", {0: "", 1: "warning\ngeffect: error: loop.json: step must be an integer\n"})
    assert failure_line(logs, 1, "") == "geffect: error: loop.json: step must be an integer"
    assert not logs.exists()


def test_a_traceback_is_its_exception_and_where_the_kept_log_is(tmp_path):
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'model.embed'\n"
    logs = rank_logs(tmp_path / "logs", {0: "", 1: trace})
    line = failure_line(logs, 1, "torchrun's own traceback\nChildFailedError")
    assert line == (f"geffect: error: rank 1 failed: KeyError: 'model.embed'; its log (kept): "
                    f"{logs / 'run_id' / 'attempt_0' / '1' / 'stderr.log'}")
    assert (logs / "run_id" / "attempt_0" / "1" / "stderr.log").read_text() == trace


def test_without_a_rank_message_torchruns_last_line_is_said_and_the_logs_removed(tmp_path):
    logs = rank_logs(tmp_path / "logs", {0: "", 1: ""})
    assert failure_line(logs, 1, "a\nRendezvousError: port taken\n") == \
        "geffect: error: torchrun ended with exit status 1 (RendezvousError: port taken)"
    assert not logs.exists()


def test_a_ranks_error_comes_before_the_stop_of_a_rank_torchrun_ended_because_of_it(tmp_path):
    stopped = "geffect: stopped by SIGTERM; a run folder keeps its last checkpoint: the same command resumes from it\n"
    logs = rank_logs(tmp_path / "logs", {0: stopped, 1: "geffect: error: step-6 holds objects other than tensors\n"})
    assert failure_line(logs, 1, "") == "geffect: error: step-6 holds objects other than tensors"
    logs = rank_logs(tmp_path / "again", {0: stopped, 1: stopped})
    assert failure_line(logs, 1, "") == stopped.strip()
