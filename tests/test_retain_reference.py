"""The retain model's saved evaluation, in each form it is read from: this project's per-sample file (one model or
several), TOFU's eval_log_forget.json and its aggregated log; bad files are one-line errors naming the file."""
import json

import numpy as np
import pytest

from geffect_kernels.eval.retain_reference import read_retain_reference

PER_SAMPLE = {"forget": {"truth_ratio": [0.5, 2.0, 1.5], "mia_loss": [1.0, 2.0, 3.0], "mia_min_k": [1.0, 4.0, 2.0]},
              "holdout": {"mia_loss": [2.5, 0.5], "mia_min_k": [3.0, 3.0]}}


def _write(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(json.dumps(value))
    return path


def test_this_projects_per_sample_files(tmp_path):
    one = read_retain_reference(_write(tmp_path, "retain_model_eval.json", PER_SAMPLE))
    assert one.forget_truth_ratios == [0.5, 2.0, 1.5] and not one.missing
    # holdout above forget: loss 2.5 beats 1 and 2, 0.5 none -> 2 of 6; min-k 3 beats 1 and 2, twice -> 4 of 6
    assert one.mia_auc == pytest.approx({"loss": 2 / 6, "min_k": 4 / 6})
    assert one.for_forget_set(3, 2).forget_truth_ratios == [0.5, 2.0]
    assert one.for_forget_set(3).forget_truth_ratios == [0.5, 2.0, 1.5]
    several = {"target": {"forget": {}}, "retain_only": PER_SAMPLE}  # the demo's per_sample.json
    demo = read_retain_reference(_write(tmp_path, "per_sample.json", several))
    assert demo.forget_truth_ratios == one.forget_truth_ratios and "retain_only" in demo.source
    no_holdout = read_retain_reference(_write(tmp_path, "f.json", {"forget": {"truth_ratio": [1.0]}}))
    assert no_holdout.mia_auc is None and "membership scores" in no_holdout.missing["privleak"]
    with pytest.raises(ValueError, match="models with a forget set: a, b"):
        read_retain_reference(_write(tmp_path, "two.json", {"a": PER_SAMPLE, "b": PER_SAMPLE}))


def test_tofus_eval_logs(tmp_path):
    para, pert = [1.0, 2.0, 0.5], [[1.5, 2.5], [1.0, 1.0], [0.5, 1.5]]
    # keys as TOFU writes them, in an order that is not numeric: the ratios follow the item index
    log = {"avg_paraphrased_loss": {"10": 0.7, **{str(i): v for i, v in enumerate(para)}},
           "average_perturb_loss": {"10": [0.7], **{str(i): v for i, v in enumerate(pert)}}}
    expected = [float(np.exp(p - np.mean(q))) for p, q in zip(para, pert)] + [1.0]
    ref = read_retain_reference(_write(tmp_path, "eval_log_forget.json", log))
    assert ref.forget_truth_ratios == pytest.approx(expected, rel=1e-15) and ref.mia_auc is None
    assert "TOFU eval log" in ref.missing["privleak"]
    aggregated = read_retain_reference(_write(tmp_path, "agg.json", {"eval_log.json": {}, "eval_log_forget.json": log}))
    assert aggregated.forget_truth_ratios == ref.forget_truth_ratios


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object"),
    ("{oops", "not valid JSON"),
    (json.dumps({"avg_paraphrased_loss": {"0": 1.0}, "average_perturb_loss": {"0": "x"}}), "list of losses"),
    (json.dumps({"avg_paraphrased_loss": {"0": 1.0, "1": 2.0}, "average_perturb_loss": {"0": [1.0]}}),
     "different forget indices"),
])
def test_bad_saved_evaluations(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_retain_reference(path)
