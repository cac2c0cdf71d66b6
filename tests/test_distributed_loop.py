"""`distributed.train_sharded` runs the one loop (`loop.run_steps`) on two gloo ranks: the evaluate hook on every
rank with the numbers of one process (and the G-effects and checkpoints after it), the progress bar on rank 0
alone, and a folder started over (resume=False) under other settings after a refusal (resume=None)."""
import json

import pytest
from transformers import AutoModelForCausalLM

from geffect_kernels.train import train

import loop_cases
from ranks import TESTS, run_ranks
from test_cli import make_workspace

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 600  # a hang, not a slow machine: CI shares its cores
COMPARED = ("lr", "loss", "forget_loss", "retain_loss", "grad_norm", "probe_nll", "e_forget", "e_retain")


def test_evaluate_and_the_progress_bar_on_ranks_and_starting_over(tmp_path):
    workspace = make_workspace(tmp_path)
    run_ranks([TESTS / "distributed" / "train_loop.py", workspace, tmp_path / "out"], world=2, timeout=TIMEOUT)
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["bars"] for r in ranks] == [[None, None], [True, True]]  # the refused run drew none

    forget, retain = loop_cases.data(workspace)
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    one = train(model, forget, retain, loop_cases.config(tmp_path / "one"), evaluate=loop_cases.probe(forget)).metrics
    assert [m["step"] for m in one if "probe_nll" in m] == [2, 4] and one[-1]["loss"] != one[0]["loss"]
    assert [m["step"] for m in one if "e_forget" in m] == [1, 3]  # step 3's G-effects follow step 2's evaluate
    for rank in ranks:
        assert [sorted(m) for m in rank["first"]] == [sorted(m) for m in one], "every rank logs what one process does"
        for a, b in zip(one, rank["first"]):
            for key in COMPARED:
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=2e-5), (a["step"], key)

    folder = tmp_path / "out" / "run"
    for rank in ranks:
        assert "other settings" in rank["refused"] or "past steps" in rank["refused"], rank["refused"]
        assert rank["resumed_from"] == 0 and [m["step"] for m in rank["again"]] == [1, 2, 3]
        assert not rank["one_process_checkpoint"]
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3] and logged[0]["lr"] == ranks[0]["again"][0]["lr"]
    assert json.loads((folder / "checkpoint" / "latest.json").read_text()) == {"step": 3, "world_size": 2}
    assert json.loads((folder / "config.json").read_text())["lr"] == 0.02
