"""`geffect train` stopped by SIGTERM (what timeout, systemd and Slurm send) and by Ctrl-C, each with one line,
then rerun to the end, equals a run never interrupted bit for bit, on two threads, and leaves no temporary file or
lock."""
import json
import signal

from safetensors.torch import load_file

from test_cli import workspace  # noqa: F401  (a fixture: a tiny model folder and TOFU files)
from test_kill_resume import STEPS, TIMEOUT, last_logged_step, start, wait_until


def test_sigterm_and_ctrl_c_resume_bit_identical(workspace, tmp_path):
    (workspace / "every_2.yaml").write_text("checkpoint_every: 2\n")
    threads = {"OMP_NUM_THREADS": "2"}  # several threads: the order of a reduction must not depend on the history
    straight = start(workspace, tmp_path / "straight", **threads)
    out = tmp_path / "stopped"
    run = out / "runs" / "npo"
    for sig, after_step, status, said in [(signal.SIGTERM, 3, 143, "geffect: stopped by SIGTERM; "),
                                          (signal.SIGINT, 5, 130, "geffect: stopped by Ctrl-C (SIGINT); ")]:
        # the run waits after step `after_step` until the signal comes: it cannot end first on a fast machine
        paused = tmp_path / f"paused-{sig.name}"
        paused.mkdir()
        process = start(workspace, out, **threads, GEFFECT_TEST_PAUSE=f"{after_step}:{paused}")
        assert wait_until((paused / "paused-0").exists, process, f"step {after_step}"), process.communicate()[0]
        assert last_logged_step(run) == after_step
        process.send_signal(sig)
        log, _ = process.communicate(timeout=TIMEOUT)
        assert process.returncode == status and log.splitlines()[-1].startswith(said), log
        assert "Traceback" not in log, log
        assert not list(run.glob(".*.tmp")) and not (run / ".lock").exists(), sorted(p.name for p in run.iterdir())
    final = start(workspace, out, **threads)
    log, _ = final.communicate(timeout=TIMEOUT)
    assert final.returncode == 0 and f"{STEPS} steps (resumed from step" in log, log
    log_straight, _ = straight.communicate(timeout=TIMEOUT)
    assert straight.returncode == 0, log_straight

    reference = tmp_path / "straight" / "runs" / "npo"
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                          for line in path.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(reference / "metrics.jsonl")
    assert (run / "geffects.json").read_text() == (reference / "geffects.json").read_text()
