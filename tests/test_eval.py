"""TOFU metrics against hand-computed values and against independent computations on a tiny model."""
import math

import numpy as np
import pytest
import torch

from geffect_kernels.data import QAPair
from geffect_kernels.eval import (answer_probability, evaluate_model, forget_quality, greedy_answers, harmonic_mean,
                                  mean_answer_logprobs, rouge_l_recall, truth_ratio, truth_score)
from geffect_kernels.train import tiny_llama
from demo_cases import tiny_demo


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    data, tokenizer = tiny_demo()
    return data, tokenizer, tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=1)


def test_rouge_l_recall_by_hand_with_porter_stemming():
    # reference words: the cat sat on the mat (6); candidate shares "the cat on the mat" in order (5)
    assert rouge_l_recall("The cat sat on the mat.", "the cat, on THE mat!") == pytest.approx(5 / 6)
    assert rouge_l_recall("Paris is big", "big is Paris") == pytest.approx(1 / 3)
    # stemmed: [he, write, novel] vs [he, wrote, the, novel]: LCS "he novel" = 2 of 3 (unstemmed it would be 1 of 3)
    assert rouge_l_recall("He writes novels", "He wrote the novel") == pytest.approx(2 / 3)
    assert rouge_l_recall("", "anything") == 0.0
    assert rouge_l_recall("a b", "") == 0.0


def test_probability_truth_ratio_and_scores_by_hand():
    lp = np.log([0.5, 0.25])
    assert answer_probability(lp) == pytest.approx([0.5, 0.25])
    perturbed = np.log([[0.25, 0.25], [0.5, 0.25]])
    assert answer_probability(lp, perturbed) == pytest.approx([0.5 / 1.0, 0.25 / 1.0])
    # R = geometric mean of perturbed / paraphrased: sqrt(0.25*0.25)/0.5 = 0.5; sqrt(0.5*0.25)/0.25 = sqrt(2)
    ratios = truth_ratio(lp, perturbed)
    assert ratios == pytest.approx([0.5, math.sqrt(2)])
    assert truth_score(ratios, forget=False) == pytest.approx((0.5 + 0.0) / 2)
    assert truth_score(ratios, forget=True) == pytest.approx((0.5 + 1 / math.sqrt(2)) / 2)


def test_harmonic_mean_and_forget_quality():
    assert harmonic_mean([1, 2, 4]) == pytest.approx(3 / (1 + 0.5 + 0.25))
    assert harmonic_mean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([float("nan"), 1])
    same = np.linspace(0.1, 2, 20)
    assert forget_quality(same, same) == pytest.approx(1.0)
    # two disjoint samples of 20: the exact two-sided KS p-value is 2 / C(40, 20)
    assert forget_quality(same, same + 10) == pytest.approx(2 / math.comb(40, 20), rel=1e-6)


def test_mean_answer_logprobs_match_the_models_own_logits(tiny):
    data, tokenizer, model = tiny
    pairs = data.forget[:3] + data.world[:2]
    got = mean_answer_logprobs(model, tokenizer, [p.question for p in pairs], [p.answer for p in pairs], batch_size=2)
    from geffect_kernels.data import encode_pair
    for value, pair in zip(got, pairs):
        ex = encode_pair(tokenizer, pair.question, pair.answer)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        target = labels[1:]
        keep = target != -100
        expected = logp[keep].gather(1, target[keep].unsqueeze(1)).mean()
        assert value.item() == pytest.approx(expected.item(), abs=1e-5)


def test_greedy_answers_match_a_manual_argmax_loop(tiny):
    data, tokenizer, model = tiny
    questions = [p.question for p in data.retain[:3]]
    got = greedy_answers(model, tokenizer, questions, max_new_tokens=6, batch_size=2)
    from geffect_kernels.data import prompt_ids
    for text, question in zip(got, questions):
        ids = prompt_ids(tokenizer, question)
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            ids.append(nxt)
        expected = tokenizer.decode(ids[len(prompt_ids(tokenizer, question)):], skip_special_tokens=True).strip()
        assert text == expected


def test_model_utility_is_tofus_nine_number_harmonic_mean(tiny):
    data, tokenizer, model = tiny
    summary, per_sample = evaluate_model(model, tokenizer, data.forget[:4], data.retain[:4], data.world[:4],
                                         real_authors=data.real_authors[:3],
                                         retain_model_forget_ratios=[0.5, 1.0, 2.0, 3.0], max_new_tokens=4)
    assert summary["forget_probability"] == pytest.approx(np.mean(per_sample["forget"]["probability"]))
    for name in ("real_authors", "world"):  # option-normalized, as TOFU scores its general-knowledge sets
        assert all(0 < p < 1 for p in per_sample[name]["probability"])
    utility = [summary[f"{s}_{m}"] for s in ("retain", "real_authors", "world")
               for m in ("probability", "rouge_l", "truth")]
    assert len(utility) == 9 and summary["model_utility"] == pytest.approx(harmonic_mean(utility))
    assert 0 <= summary["forget_quality"] <= 1
    # fewer sets: the smaller harmonic mean is named after them, never model_utility
    fewer, _ = evaluate_model(model, tokenizer, data.forget[:4], data.retain[:4], data.world[:4], max_new_tokens=4)
    assert "model_utility" not in fewer and fewer["retain_world_utility"] == pytest.approx(harmonic_mean(
        [fewer[f"{s}_{m}"] for s in ("retain", "world") for m in ("probability", "rouge_l", "truth")]))
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(model, tokenizer, [], None, None)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        evaluate_model(model, tokenizer, data.forget[:2], max_new_tokens=0)


def test_normalized_probability_needs_perturbed_answers(tiny):
    _, tokenizer, model = tiny
    from geffect_kernels.eval import score_set
    with pytest.raises(ValueError, match="perturbed"):
        score_set(model, tokenizer, [QAPair("Q?", "A.")], normalized=True, generate=False)


def test_sets_without_paraphrases_use_the_answer_as_the_truth_ratios_reference(tiny):
    data, tokenizer, model = tiny
    from geffect_kernels.eval import score_set
    pairs = [QAPair(p.question, p.answer, None, p.perturbed_answers) for p in data.real_authors[:3]]
    got = score_set(model, tokenizer, pairs, normalized=True, generate=False)
    questions = [p.question for p in pairs]
    answer = mean_answer_logprobs(model, tokenizer, questions, [p.answer for p in pairs]).numpy()
    k = len(pairs[0].perturbed_answers)
    perturbed = mean_answer_logprobs(model, tokenizer, [q for q in questions for _ in range(k)],
                                     [a for p in pairs for a in p.perturbed_answers]).numpy().reshape(3, k)
    assert got["truth_ratio"] == pytest.approx(np.exp(perturbed.mean(-1) - answer), rel=1e-6)
    assert got["probability"] == pytest.approx(np.exp(answer) / (np.exp(answer) + np.exp(perturbed).sum(-1)))
    assert got["perturbed_probability"] == pytest.approx(np.exp(perturbed).mean(-1), rel=1e-6)
    assert "paraphrased_probability" not in got


def test_summary_names_what_it_could_not_compute_and_gives_mia_and_privleak(tiny):
    data, tokenizer, model = tiny
    summary, per_sample = evaluate_model(model, tokenizer, data.forget[:4], max_new_tokens=2)
    assert "forget_quality" not in summary and "retain model" in summary["missing"]["forget_quality"]
    assert "holdout" in summary["missing"]["mia_auc"] and "privleak" not in summary
    no_truth = [QAPair(p.question, p.answer) for p in data.forget[:3]]
    summary, _ = evaluate_model(model, tokenizer, no_truth, retain_model_forget_ratios=[1.0], max_new_tokens=2)
    assert "perturbed answers" in summary["missing"]["forget_quality"]
    holdout = data.retain[:5]
    summary, per_sample = evaluate_model(model, tokenizer, data.forget[:4], holdout=holdout, max_new_tokens=2,
                                         retain_model_mia_auc={"min_k": 0.25})
    from geffect_kernels.eval.membership import auc
    for attack in ("loss", "zlib", "min_k", "min_k++"):
        assert summary["mia_auc"][attack] == pytest.approx(
            auc(per_sample["forget"][f"mia_{attack}"], per_sample["holdout"][f"mia_{attack}"]))
    expected = ((1 - summary["mia_auc"]["min_k"]) - 0.75) / 0.75 * 100
    assert summary["privleak"] == pytest.approx(expected)
    assert len(per_sample["holdout"]["mia_loss"]) == 5
    assert summary["forget_exact_memorization"] == pytest.approx(np.mean(per_sample["forget"]["exact_memorization"]))


def test_privleak_against_a_retain_model_with_nothing_to_divide_by_is_reported():
    from geffect_kernels.eval import summarize
    forget = {"probability": [0.5, 0.4], "mia_loss": [1.0, 2.0], "mia_min_k": [1.0, 2.0]}
    holdout = {"mia_loss": [3.0, 4.0], "mia_min_k": [3.0, 4.0]}
    summary = summarize(forget, holdout=holdout, retain_model_mia_auc={"min_k": 1.0})
    assert summary["mia_auc"] == {"loss": 1.0, "min_k": 1.0} and "undefined" in summary["missing"]["privleak"]
    summary = summarize(forget, holdout={**holdout, "mia_loss": [float("nan"), 1.0]})
    assert "NaN" in summary["missing"]["mia_auc"] and "mia_auc" not in summary
