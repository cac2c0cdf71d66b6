"""`geffect train --eval` with TOFU's files as published: the retain model (evaluated here or from a saved log, this
project's or TOFU's), a separate utility set, holdout questions for membership inference, and --eval-size."""
import json

import numpy as np
import pytest
from scipy.stats import ks_2samp

from geffect_kernels.data import QAPair, demo_data, qa_texts, save_qa, train_tokenizer
from geffect_kernels.train import tiny_llama

from test_cli import run

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tofu(tmp_path_factory):
    """A tiny model, a retain model, and files in TOFU's published forms: real authors as JSON Lines in a .json
    file without paraphrased answers, world facts as a Hub-style parquet folder, a retain_perturbed set."""
    root = tmp_path_factory.mktemp("tofu")
    data = demo_data(4, forget_fraction=0.25)
    tokenizer = train_tokenizer(qa_texts(data.all_training + data.holdout), vocab_size=300)
    for name, seed in (("model", 0), ("retain_model", 1)):
        model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    save_qa(data.forget, root / "forget10_perturbed.json")
    save_qa(data.retain, root / "retain90.json")
    save_qa(data.retain[:6], root / "retain_perturbed.json")
    save_qa(data.holdout, root / "holdout10.json")
    (root / "real_authors_perturbed.json").write_text("\n".join(json.dumps(
        {"question": p.question, "answer": p.answer, "perturbed_answer": list(p.perturbed_answers)})
        for p in data.real_authors[:5]) + "\n")
    (root / "world_facts_perturbed").mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": p.question, "answer": p.answer,
                                          "perturbed_answer": list(p.perturbed_answers)} for p in data.world[:5]]),
                   root / "world_facts_perturbed" / "train-00000-of-00001.parquet")
    muse = root / "muse"
    for part in ("verbmem", "knowmem", "privleak"):
        (muse / part).mkdir(parents=True)
    (muse / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": p.question, "gt": p.answer}
                                                              for p in data.forget[:3]]))
    (muse / "knowmem" / "forget_qa.json").write_text(json.dumps([{"question": p.question, "answer": p.answer}
                                                                 for p in data.forget[3:6]]))
    (muse / "privleak" / "forget.json").write_text(json.dumps([p.answer for p in data.forget[:5]]))
    (muse / "privleak" / "holdout.json").write_text(json.dumps([p.answer for p in data.holdout[:5]]))
    return root


def _train(capsys, root, out, *extra):
    code, stdout, err = run(capsys, "train", "--model", root / "model", "--forget", root / "forget10_perturbed.json",
                            "--retain", root / "retain90.json", "--steps", 1, "--batch-size", 2, "--eval",
                            "--max-new-tokens", 2, "--no-progress", "--out", out, *extra)
    assert code == 0, err
    results = out / "results"
    return json.loads((results / "summary.json").read_text())["ga"], \
        json.loads((results / "per_sample.json").read_text())["ga"], stdout


def _auc(forget, holdout):
    pairs = [(h > f) + 0.5 * (h == f) for f in forget for h in holdout]
    return sum(pairs) / len(pairs)


def test_retain_model_gives_forget_quality_and_privleak_on_tofus_files(capsys, tofu, tmp_path):
    summary, per_sample, _ = _train(capsys, tofu, tmp_path / "a", "--retain-model", tofu / "retain_model",
                                    "--holdout", tofu / "holdout10.json", "--retain-eval-set",
                                    tofu / "retain_perturbed.json", "--real-authors",
                                    tofu / "real_authors_perturbed.json", "--world", tofu / "world_facts_perturbed",
                                    "--eval-size", 4, "--muse", tofu / "muse")
    assert "missing" not in summary, summary.get("missing")
    assert {len(per_sample[s]["probability"]) for s in ("forget", "retain", "real_authors", "world")} == {4}
    assert len(per_sample["holdout"]["mia_loss"]) == 4 and "model_utility" in summary
    reference = json.loads((tmp_path / "a" / "results" / "retain_model_eval.json").read_text())
    assert len(reference["forget"]["truth_ratio"]) == 4
    expected = ks_2samp(per_sample["forget"]["truth_ratio"], reference["forget"]["truth_ratio"]).pvalue
    assert summary["forget_quality"] == pytest.approx(expected, rel=1e-12)
    for attack in ("loss", "zlib", "min_k", "min_k++"):
        key = f"mia_{attack}"
        assert summary["mia_auc"][attack] == pytest.approx(_auc(per_sample["forget"][key], per_sample["holdout"][key]))
    muse = 1 - summary["mia_auc"]["min_k"]
    muse_retain = 1 - _auc(reference["forget"]["mia_min_k"], reference["holdout"]["mia_min_k"])
    assert summary["privleak"] == pytest.approx((muse - muse_retain) / muse_retain * 100)
    # MUSE's files alongside: privleak against the retain model's scores on the same texts
    muse = (summary["muse"], per_sample["muse"], reference["muse_privleak"])
    assert {"verbmem_f", "knowmem_f", "privleak"} <= set(muse[0]) and "knowmem_r" in muse[0]["missing"]
    auc = _auc(muse[1]["privleak"]["forget"]["mia_min_k"], muse[1]["privleak"]["holdout"]["mia_min_k"])
    muse_retain = 1 - _auc(muse[2]["forget"]["mia_min_k"], muse[2]["holdout"]["mia_min_k"])
    assert muse[0]["privleak"] == pytest.approx(((1 - auc) - muse_retain) / muse_retain * 100)
    assert len(muse[1]["privleak"]["forget"]["mia_loss"]) == 4  # --eval-size applies to MUSE's parts too
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## MUSE" in report and "- muse knowmem\\_r not computed for ga: no knowmem/retain\\_qa." in report
    # the saved evaluation stands in for the model, with the same numbers
    again, _, _ = _train(capsys, tofu, tmp_path / "b", "--retain-eval", tmp_path / "a" / "results" /
                         "retain_model_eval.json", "--holdout", tofu / "holdout10.json", "--eval-size", 4)
    assert again["forget_quality"] == pytest.approx(summary["forget_quality"], rel=1e-6)
    assert again["privleak"] == pytest.approx(summary["privleak"], rel=1e-6, abs=1e-9)


def test_tofus_eval_log_as_the_retain_evaluation(capsys, tofu, tmp_path):
    rng = np.random.default_rng(0)
    paraphrased, perturbed = rng.uniform(1, 3, 11), rng.uniform(1, 3, (11, 3))
    log = {"avg_gt_loss": {str(i): 1.0 for i in range(11)},
           "avg_paraphrased_loss": {str(i): float(v) for i, v in enumerate(paraphrased)},
           "average_perturb_loss": {str(i): list(map(float, v)) for i, v in enumerate(perturbed)}}
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(log))
    summary, per_sample, stdout = _train(capsys, tofu, tmp_path / "run", "--retain-eval",
                                         tmp_path / "eval_log_forget.json")
    # TOFU's aggregate_eval_stat: KS test of exp(perturbed − paraphrased loss), the inverse of R
    tofu_statistic = np.exp(perturbed.mean(-1) - paraphrased)
    expected = ks_2samp(1 / np.array(per_sample["forget"]["truth_ratio"]), tofu_statistic).pvalue
    assert summary["forget_quality"] == pytest.approx(expected, rel=1e-12)
    assert "holdout" in summary["missing"]["privleak"] and "TOFU eval log" in summary["retain_reference"]
    assert "privleak not computed: no holdout set" in stdout


def test_without_a_retain_model_the_summary_says_why(capsys, tofu, tmp_path):
    summary, _, stdout = _train(capsys, tofu, tmp_path / "run")
    assert "forget_quality" not in summary and "--retain-model" in summary["missing"]["forget_quality"]
    assert "ga: forget quality not computed: no retain model" in stdout
    report = (tmp_path / "run" / "report.md").read_text()
    assert "- forget quality not computed for ga: no retain model" in report
    no_truth = tmp_path / "forget10.json"
    save_qa([QAPair("Who?", "Someone.")] * 3, no_truth)
    code, _, err = run(capsys, "train", "--model", tofu / "model", "--forget", no_truth, "--retain",
                       tofu / "retain90.json", "--steps", 1, "--batch-size", 2, "--eval", "--max-new-tokens", 1,
                       "--no-progress", "--out", tmp_path / "nt", "--retain-model", tofu / "retain_model")
    assert code == 0, err
    summary = json.loads((tmp_path / "nt" / "results" / "summary.json").read_text())["ga"]
    assert "no perturbed answers" in summary["missing"]["forget_quality"]


@pytest.mark.parametrize("extra, message", [
    (["--holdout", "x.json"], "--holdout is for the evaluation: add --eval"),
    (["--eval", "--eval-size", "0"], "--eval-size must be a positive integer, got 0"),
    (["--eval", "--retain-model", "m", "--retain-eval", "f.json"], "either as --retain-model DIR or as --retain-eval"),
    (["--eval", "--retain-eval", "missing.json"], "missing.json: no such file"),
    (["--eval", "--retain-model", "nowhere"], "nowhere is not a Hugging Face model directory"),
])
def test_bad_eval_flags_fail_before_training(capsys, tofu, tmp_path, extra, message):
    code, _, err = run(capsys, "train", "--model", tofu / "model", "--forget", tofu / "forget10_perturbed.json",
                       "--retain", tofu / "retain90.json", "--steps", 1, "--out", tmp_path / "o", *extra)
    assert code == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_summary_files_are_checked_at_every_depth():
    from geffect_kernels.eval.run_files import check_summaries
    good = {"ga": {"forget_quality": 0.5, "mia_auc": {"loss": 0.6}, "retain_reference": "retain model m",
                   "muse": {"verbmem_f": 12.0, "mia_auc": {"min_k": 0.5}, "missing": {"knowmem_r": "why"}},
                   "missing": {"privleak": "why"}}}
    assert check_summaries(good, "s.json") == good
    with pytest.raises(ValueError, match="ga.muse.mia_auc.min_k must be a number"):
        check_summaries({"ga": {"muse": {"mia_auc": {"min_k": "high"}}}}, "s.json")
    with pytest.raises(ValueError, match="ga.muse.missing must map metrics to reasons"):
        check_summaries({"ga": {"muse": {"missing": {"knowmem_r": 3}}}}, "s.json")
    with pytest.raises(ValueError, match="ga.retain_reference must be text"):
        check_summaries({"ga": {"retain_reference": 1.0}}, "s.json")
