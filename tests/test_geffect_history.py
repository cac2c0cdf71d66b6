"""GEffectHistory: per-step and cumulative tables, CSV/JSON round trip, PNG figures."""
import csv
import json

import pytest

from geffect_kernels.geffect import GEffectHistory, GEffectResult


def result(step):
    groups = {"embedding": {"forget": -1.0 * step, "retain": 0.5}, "layer.0": {"forget": -2.0, "retain": -0.25 * step}}
    total = {r: sum(g[r] for g in groups.values()) for r in ("forget", "retain")}
    return GEffectResult(total, groups, per_instance={"forget": [total["forget"]], "retain": [total["retain"]]},
                         losses={"objective": 1.0 + step}, retain_term=GEffectResult({"forget": 0.1}, {}))


@pytest.fixture
def history():
    h = GEffectHistory("npo")
    for step in (0, 5, 10):
        h.record(step, result(step))
    return h


def test_per_step_and_cumulative(history):
    assert history.per_step("forget") == [-2.0, -7.0, -12.0]
    assert history.cumulative("forget") == [-2.0, -9.0, -21.0]
    assert history.cumulative("retain", "layer.0") == [0.0, -1.25, -3.75]
    assert history.groups == ["embedding", "layer.0"] and history.risks == ["forget", "retain"]
    with pytest.raises(ValueError, match="steps must increase"):
        history.record(10, result(1))


def test_csv_and_json_round_trip(history, tmp_path):
    rows = list(csv.DictReader(open(history.to_csv(tmp_path / "g.csv"))))
    assert len(rows) == 3 * 2 * 3  # steps × risks × (total + 2 groups)
    last = [r for r in rows if r["step"] == "10" and r["group"] == "total" and r["risk"] == "forget"]
    assert float(last[0]["value"]) == -12.0 and float(last[0]["cumulative"]) == -21.0
    path = history.to_json(tmp_path / "g.json")
    again = GEffectHistory.from_json(path)
    assert again.objective == "npo" and again.steps == history.steps
    assert [r.to_dict() for r in again.results] == [r.to_dict() for r in history.results]
    assert json.loads(path.read_text())["records"][1]["retain_term"]["total"] == {"forget": 0.1}


def test_plots_are_pngs(history, tmp_path):
    paths = history.plot(tmp_path / "plots")
    assert [p.name for p in paths] == ["npo_heatmap_forget.png", "npo_heatmap_retain.png", "npo_cumulative.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    with pytest.raises(ValueError, match="empty"):
        GEffectHistory().plot(tmp_path)
