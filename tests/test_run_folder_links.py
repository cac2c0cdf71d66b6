"""Symbolic links below ``--out`` are refused in one line before anything is written: a run never writes, replaces
or deletes through ``runs/``, ``runs/<objective>``, ``results/`` or a run's own files and folders. ``--out``
itself may be a link (a run folder on another disk)."""
import pytest

from geffect_kernels.train import train
from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)
from test_train import config, model_of, setup  # noqa: F401  (setup is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder):
    """Every file under ``folder`` with its bytes (links not followed)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(workspace, tmp_path_factory):
    """A finished one-step run, written through an --out that is itself a link (allowed)."""
    root = tmp_path_factory.mktemp("links")
    (root / "disk").mkdir()
    (root / "out").symlink_to(root / "disk")
    argv = ["train", "--model", workspace / "model", "--forget", workspace / "forget.json", "--retain",
            workspace / "retain.json", "--steps", 1, "--batch-size", 2, "--no-progress", "--out", root / "out"]
    code = run_quietly(argv)
    assert code == 0 and (root / "disk" / "runs" / "ga" / "model").is_dir()
    ((root / "disk" / "results").mkdir(exist_ok=True))
    (root / "disk" / "results" / "summary.json").write_text('{"ga": {"forget_quality": 0.5}}')
    return root / "disk", argv[:-1]


def run_quietly(argv):
    from geffect_kernels.cli import main
    return main([str(a) for a in argv])


@pytest.mark.parametrize("linked, extra", [("runs", []), ("runs/ga", ["--overwrite"]), ("results", []),
                                           ("results", ["--eval", "--max-new-tokens", "2"]),
                                           ("results/summary.json", []), ("runs/ga/model", []),
                                           ("runs/ga/metrics.jsonl", []), ("runs/ga/checkpoint.pt", ["--resume"])])
def test_a_link_below_out_is_refused_before_anything_is_written(capsys, finished, tmp_path, linked, extra):
    other, argv = finished
    out = tmp_path / "out"
    out.mkdir()
    target = out / linked
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(other / linked, target_is_directory=(other / linked).is_dir())
    before, here = snapshot(other), snapshot(out)
    code, stdout, err = run(capsys, *argv, out, *extra)
    inside = out if linked.split("/")[0] != "runs" or linked.count("/") < 2 else out / "runs" / "ga"
    assert code == 1 and err == (f"geffect: error: {target} is a symbolic link: a run writes only inside {inside}, "
                                 f"never through a link; remove it or choose another --out (nothing was written)\n")
    assert snapshot(other) == before and snapshot(out) == here and target.is_symlink()


def test_the_training_api_refuses_a_link_among_a_runs_files(setup, tmp_path):
    tokenizer, forget, retain = setup
    (tmp_path / "elsewhere.jsonl").write_text("keep\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(ValueError, match=r"run/metrics.jsonl is a symbolic link"):
        train(model_of(tokenizer), forget, retain, config(tmp_path / "run", objective="ga", steps=1))
    assert (tmp_path / "elsewhere.jsonl").read_text() == "keep\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
