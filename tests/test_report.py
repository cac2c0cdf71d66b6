"""The report over several seeds: mean [min, max] per TOFU number and G-effect sum, CSV columns, and the
observations' verdicts from the runs' own numbers (NPO's weights and instance damage from `NPOProbe`)."""
import csv
import json

import numpy as np
import pytest
import torch

from geffect_kernels.data import encode_pairs
from geffect_kernels.eval.report import headline, make_report, split_run_name
from geffect_kernels.train import TrainConfig, tiny_llama, train
from geffect_kernels.train.demo_probes import NPOProbe, probability_probe
from geffect_kernels.catalog import OBJECTIVES
from demo_cases import tiny_demo


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_seed_runs(tmp_path_factory):
    """ga and npo unlearned twice (seeds 0, 1) from one tiny model, with the demo's probes and G-effects."""
    data, tokenizer = tiny_demo()
    forget, retain = encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain)
    start = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0)
    out = tmp_path_factory.mktemp("report")
    probe = probability_probe(tokenizer, data.forget, data.retain)
    npo_probe = NPOProbe(start, forget, retain, beta=0.5, retain_samples=6)
    trajectories, summaries = [], {}
    for seed in (0, 1):
        for name in ("ga", "npo"):
            model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=0)
            config = TrainConfig(objective=name, steps=3, batch_size=4, lr=5e-3, seed=seed, geffect_every=1,
                                 eval_every=1, out_dir=str(out / "runs" / f"{name}-seed{seed}"), progress=False,
                                 hparams={"beta": 0.5} if name == "npo" else {})
            hook = (lambda m: {**probe(m), **npo_probe(m)}) if name == "npo" else probe
            result = train(model, forget, retain, config, evaluate=hook)
            trajectories += [{"objective": name, "seed": seed, "step": m["step"],
                              **{k: v for k, v in m.items() if k.startswith("probe_")}}
                             for m in result.metrics]
            summaries[f"{name}-seed{seed}"] = {"forget_probability": 0.1 * (seed + 1), "model_utility": 0.5}
    (out / "results").mkdir()
    (out / "results" / "summary.json").write_text(json.dumps({"target": {"forget_probability": 0.9}, **summaries}))
    (out / "results" / "trajectories.json").write_text(json.dumps(trajectories))
    return out, trajectories, npo_probe, start


def test_npo_probe_weights_are_npos_and_equal_one_at_the_reference(two_seed_runs):
    _, trajectories, npo_probe, start = two_seed_runs
    at_start = npo_probe(start)
    assert at_start["probe_npo_weights"] == pytest.approx([1.0] * len(npo_probe.ref_seq), abs=1e-12)
    assert len(at_start["probe_instance_damage"]) == len(npo_probe.ref_seq)
    moved = [t for t in trajectories if t["objective"] == "npo"][-1]
    assert all(0 < w < 2 for w in moved["probe_npo_weights"]) and np.ptp(moved["probe_npo_weights"]) > 0
    # independent check of the weight formula on the probe's own sequence log-probabilities
    seq = torch.tensor([-3.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    expected = [2 / (1 + np.exp(-0.5 * (s - r))) for s, r in ((-3.0, -2.0), (-1.0, -2.0))]
    got = OBJECTIVES["npo"].sequence_weight(seq, ref, None, {"beta": 0.5})
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_report_gives_mean_and_range_over_seeds_and_seed_verdicts(two_seed_runs):
    out, _, _, _ = two_seed_runs
    report = make_report(out).read_text()
    assert "| npo | 0.500 [0.500, 0.500] | 0.150 [0.100, 0.200] |" in report  # model utility, forget probability
    assert "| target | – | 0.900 |" in report  # trained once: one value, no range
    with open(out / "results" / "summary.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert rows["npo"]["seeds"] == "2" and float(rows["npo"]["forget_probability"]) == pytest.approx(0.15)
    with open(out / "results" / "summary_seeds.csv") as f:
        assert sum(r["model"] == "ga" for r in csv.DictReader(f)) == 2
    geffect_rows = [line for line in report.splitlines() if line.startswith("| ga | 2 | 3 |")]
    assert len(geffect_rows) == 1 and geffect_rows[0].count("[") == 3  # each sum with its range
    verdicts = json.loads((out / "results" / "observations.json").read_text())
    assert sorted(verdicts) == list("abcde")  # (f) needs the token-weighted objectives too
    for letter in "abcde":
        line = next(x for x in report.splitlines() if x.startswith(f"- ({letter})"))
        assert "seed 0:" in line and "seed 1:" in line, line
        assert line.endswith(f"— {verdicts[letter]}.") and verdicts[letter] in (
            "holds", "does not hold", "depends on the seed (holds for 1 of 2)"), line
    lines = headline(out)
    assert lines[0].startswith("ga: forget quality –, model utility 0.500 [0.500, 0.500], forget probability 0.150")
    assert lines[2] == f"(a) GA's retaining G-effect is negative: {verdicts['a']}" and len(lines) == 2 + 5


def test_run_names_carry_the_seed():
    assert split_run_name("wtnpo-seed12") == ("wtnpo", 12)
    assert split_run_name("target") == ("target", None)
    assert split_run_name("my-run") == ("my-run", None)


def test_headline_gives_guided_variants_rows_and_one_verdict_line(tmp_path):
    (tmp_path / "results").mkdir()
    row = {"forget_quality": 0.5, "model_utility": 0.4, "forget_probability": 0.01, "retain_probability": 0.8}
    (tmp_path / "results" / "summary.json").write_text(json.dumps(
        {"ga-seed0": row, "ga+rectify-seed0": {**row, "retain_probability": 0.9}}))
    (tmp_path / "results" / "observations.json").write_text(json.dumps(
        {"a": "holds", "g ga+rectify": "holds", "g npo+instance": "does not hold"}))
    lines = headline(tmp_path)
    assert lines[1].startswith("ga+rectify: forget quality 0.500") and "retain probability 0.900" in lines[1]
    assert lines[2].startswith("(a) ")
    assert lines[3] == ("(g) G-effect guidance reaches its objective's forget level with less retain damage: "
                        "ga+rectify holds; npo+instance does not hold")
    assert len(lines) == 4
