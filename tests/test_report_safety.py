"""`geffect report` on a crafted run folder: a name that would become a path outside the folder, a link planted
where the report writes, text where numbers belong: each refused in one line with nothing written outside the
folder; names shown literally in report.md."""
import json

import pytest

from geffect_kernels.eval.report import make_report
from geffect_kernels.eval.run_files import check_name, markdown
from test_cli import run


def run_folder(root, objective="ga", risks=("forget", "retain"), values=(0.5, -0.25)):
    """A single training run's files: two logged steps, its config and a two-step G-effect history."""
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    (root / "config.json").write_text(json.dumps({"objective": objective}))
    records = [{"step": s, "total": dict(zip(risks, values)),
                "by_group": {"layer.0": dict(zip(risks, values)), "layer.1": {r: 0.0 for r in risks}}}
               for s in (1, 2)]
    (root / "geffects.json").write_text(json.dumps({"objective": objective, "records": records}))
    return root


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line_error(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 1 and err.startswith("geffect: error:") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("objective, risk, named", [
    ("x/../../../name", "forget", "objective 'x/../../../name' is not a safe name"),
    ("ga", "/../../name", "risk '/../../name' is not a safe name"),
    ("..", "forget", "objective '..' is not a safe name"),
])
def test_names_that_would_leave_the_folder_are_refused(capsys, tmp_path, objective, risk, named):
    run_dir = run_folder(tmp_path / "a" / "b" / "c" / "run", objective=objective, risks=(risk, "retain"))
    before = files_under(tmp_path)
    err = one_line_error(capsys, "report", run_dir)
    assert named in err and "nothing written" in err
    assert files_under(tmp_path) == before  # not even results/ or plots/ inside the folder


def test_a_link_planted_where_the_report_writes_is_replaced_or_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.md").write_text("keep")
    run_dir = run_folder(tmp_path / "run")
    (run_dir / "report.md").symlink_to(outside / "precious.md")
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "ga_heatmap_forget.png").symlink_to(outside / "precious.md")
    make_report(run_dir)
    assert (outside / "precious.md").read_text() == "keep" and files_under(outside) == ["precious.md"]
    assert not (run_dir / "report.md").is_symlink() and "# G-effect unlearning report" in (run_dir / "report.md"
                                                                                           ).read_text()
    assert (run_dir / "plots" / "ga_heatmap_forget.png").read_bytes().startswith(b"\x89PNG")
    (run_dir / "results").rename(run_dir / "results_moved")
    (run_dir / "results").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"run/results is not a folder inside .*run \(a link or a file\)"):
        make_report(run_dir)
    assert files_under(outside) == ["precious.md"]


def test_text_where_numbers_belong_is_refused_in_one_line(capsys, tmp_path):
    run_dir = run_folder(tmp_path / "run")
    history = json.loads((run_dir / "geffects.json").read_text())
    history["records"][1]["total"]["forget"] = "0.5"
    (run_dir / "geffects.json").write_text(json.dumps(history))
    assert "total.forget must be a number, got '0.5'" in one_line_error(capsys, "report", run_dir)
    (run_dir / "geffects.json").unlink()
    results = run_dir / "results"
    results.mkdir()
    for name, content, named in [
        ("summary.json", {"ga": {"forget_probability": "high"}}, "summary.json: ga.forget_probability must be a "
                                                                 "number, got 'high'"),
        ("summary.json", {"ga": {"mia_auc": {"loss": [1]}}}, "ga.mia_auc.loss must be a number"),
        ("summary.json", ["ga"], "summary.json: must map each model's name to its metrics"),
        ("timing.json", {"seconds": "12", "torch_threads": 2}, "timing.json: seconds must be a number"),
    ]:
        (results / name).write_text(json.dumps(content))
        assert named in one_line_error(capsys, "report", run_dir), name
        (results / name).unlink()
    (results / "summary.json").write_text(json.dumps({"ga": {"forget_probability": 0.5}}))
    (results / "trajectories.json").write_text(json.dumps([{"objective": "ga", "seed": 0, "step": 1,
                                                            "probe_forget_probability": "x"}]))
    assert "point 0's probe_forget_probability must be a number" in one_line_error(capsys, "report", run_dir)


def test_names_are_shown_literally_in_the_report(tmp_path):
    run_dir = tmp_path / "run"
    run_folder(run_dir / "runs" / "ga", objective="ga")
    (run_dir / "results").mkdir()
    (run_dir / "results" / "summary.json").write_text(json.dumps({
        "<img src=x>|*ga*": {"forget_probability": 0.5, "missing": {"model_utility": "no [link](http://x)"}}}))
    report = make_report(run_dir).read_text()
    assert r"| \<img src=x\>\|\*ga\* | 0.500 |" in report
    assert r"no \[link\]\(http://x\)" in report and "<img" not in report.replace("\\<img", "")


def test_safe_names():
    for name in ("ga", "npo-seed2", "retain_only", "wtnpo.v2", "a+b"):
        assert check_name(name, "run", "here") == name
    for name in ("", "..", ".hidden", "a/b", "a\\b", "a b", "x" * 101, None, 3, "é"):
        with pytest.raises(ValueError, match="is not a safe name"):
            check_name(name, "run", "here")
    assert markdown("a|b\nc") == r"a\|b c"
