"""`geffect train` with PO, DPO, RMU, the RR retain term and PDU: they run from the command line, and their bad input
(an alternate file with no answers, no --alternate, a layer outside the model) is one line, exit 1, nothing
written."""
import json

import pytest

from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)
from test_cli_misuse import one_line_error, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_po_rmu_rr_and_pdu_train_from_the_command_line(capsys, workspace, tmp_path):
    refusals = tmp_path / "idontknow.jsonl"
    refusals.write_text("I'm not sure.\nI don't have that information.\n")
    out = tmp_path / "out"
    got, printed, err = run(capsys, *train_argv(workspace, out, "--objective", "po", "rmu", "--alternate", refusals,
                                                "--retain-objective", "rr", "--primal-dual", "0.5", "--steps", 2))
    assert got == 0, err
    for name in ("po", "rmu"):
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and metrics[0]["dual"] == 1.0 and "retain_loss" in metrics[0]
        config = json.loads((out / "runs" / name / "config.json").read_text())
        assert config["retain_objective"] == "rr" and config["primal_dual"] == 0.5
        assert config["alternate"] == str(refusals)


def test_bad_objective_input_is_one_line_before_anything_is_written(capsys, workspace, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    for extra, message in [(["--objective", "po"], "reads substitute answers: pass --alternate FILE"),
                           (["--objective", "dpo", "--alternate", empty], "holds no substitute answers"),
                           (["--objective", "ga", "rmu", "--hparam", "layer=9"], "outside the model's"),
                           (["--objective", "rmu", "--hparam", "layer=0.5"], "integer"),
                           (["--primal-dual", "-1"], "primal_dual"),
                           (["--retain-objective", "rr", "--hparam", "layer=1"], "taken by none of the objectives")]:
        assert message in one_line_error(capsys, *train_argv(workspace, out, *extra)), extra
    assert not out.exists()
