"""The demo's case study in the report: GA, NPO, PO and RMU runs with `RetainTermProbe` give the table of the
objectives' and the NLL, KL and RR retain terms' summed G-effects, its CSV, the terms' heatmaps and observations
(h)–(k)."""
import csv
import json

import pytest

from geffect_kernels.data import encode_pairs
from geffect_kernels.data.demo import REFUSALS
from geffect_kernels.eval.report import headline, make_report
from geffect_kernels.geffect import GEffectHistory
from geffect_kernels.train import TrainConfig, tiny_llama, train
from geffect_kernels.train.demo_probes import CASE_TERMS, RetainTermProbe
from geffect_kernels.train.frozen_model import frozen_copy
from geffect_kernels.train.run_demo import CASE_STUDY, OBJECTIVE_NAMES, RETAIN_TERMS_FILE
from demo_cases import tiny_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_case_study_table_heatmaps_and_observations(tmp_path):
    data, tokenizer = tiny_demo()
    forget, retain = encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain)
    start = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0)
    reference = frozen_copy(start)
    refusals = tmp_path / "idontknow.jsonl"
    refusals.write_text("\n".join(REFUSALS))
    assert set(CASE_STUDY) <= set(OBJECTIVE_NAMES)
    for name in CASE_STUDY:
        model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0)
        config = TrainConfig(objective=name, steps=4, batch_size=4, lr=5e-3, geffect_every=1, eval_every=1,
                             out_dir=str(tmp_path / "runs" / f"{name}-seed0"), progress=False, alternate=str(refusals))
        probe = RetainTermProbe(reference, forget.batch(range(4)), retain.batch(range(4)), probe_every=1, every=2,
                                layer=config.hparams.get("layer"))
        train(model, forget, retain, config, evaluate=probe)
        assert [h.steps for h in probe.histories.values()] == [[2, 4]] * len(CASE_TERMS)
        (tmp_path / "runs" / f"{name}-seed0" / RETAIN_TERMS_FILE).write_text(
            json.dumps({t: h.to_dict() for t, h in probe.histories.items()}))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text(json.dumps({"target": {"forget_probability": 0.9}}))
    report = make_report(tmp_path).read_text()
    assert "## The paper's case study: objectives and retain terms" in report
    for name in CASE_STUDY:
        assert f"| {name} |" in report
        for term in CASE_TERMS:
            assert (tmp_path / "plots" / f"{name}_{term}_term_heatmap_retain.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "results" / "case_study.csv")))
    expected = {(o, t) for o in CASE_STUDY for t in ("objective", *CASE_TERMS)}
    assert {(r["objective"], r["term"]) for r in rows} == expected
    kept = json.loads((tmp_path / "runs" / "rmu-seed0" / RETAIN_TERMS_FILE).read_text())
    nll = GEffectHistory.from_dict(kept["nll"])
    row = next(r for r in rows if r["objective"] == "rmu" and r["term"] == "nll")
    assert float(row["sum_e_retain"]) == pytest.approx(sum(nll.per_step("retain")), rel=1e-12)
    assert sum(nll.per_step("retain")) > 0  # the NLL term's retaining G-effect is ‖∇R_r‖² on its own batch
    verdicts = json.loads((tmp_path / "results" / "observations.json").read_text())
    assert {"h", "i", "j", "k"} <= set(verdicts)
    lines = headline(tmp_path)
    assert any(line.startswith("(k) the KL and RR retain terms") for line in lines)
