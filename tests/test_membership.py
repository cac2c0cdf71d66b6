"""Membership inference and memorization against formulas written out here, independently of the package:
open-unlearning's attacks (loss, zlib, min-k%, min-k%++), the ROC AUC, MUSE's privleak, exact memorization and
extraction strength, and the per-token statistics they are computed from."""
import heapq
import math
import zlib

import numpy as np
import pytest
import torch

from geffect_kernels.data import encode_pair
from geffect_kernels.eval import membership, memorization, sample_stats
from geffect_kernels.eval.likelihood import memorization_scores
from geffect_kernels.train import tiny_llama
from demo_cases import tiny_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def _distribution(h, w, b, softcap):
    z = h.double() @ w.double().T + b.double()
    z = softcap * torch.tanh(z / softcap)
    p = torch.softmax(z, -1)
    return z, p, torch.log(p)


@pytest.mark.parametrize("chunk", [7, 1 << 24])  # several chunks of rows, and one
def test_head_stats_match_the_distribution(monkeypatch, chunk):
    monkeypatch.setattr(sample_stats, "_CHUNK_ELEMENTS", chunk * 37)
    n, hidden, vocab = 23, 11, 37
    h, w, b = torch.randn(n, hidden, dtype=torch.float64), torch.randn(vocab, hidden, dtype=torch.float64), \
        torch.randn(vocab, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,))
    z, p, logp = _distribution(h, w, b, 3.0)
    y[:5] = z[:5].argmax(-1)  # some hits for sure
    lp, ent, var, hit = sample_stats.head_stats(h, w, y, bias=b, softcap=3.0)
    expected_mean = (p * logp).sum(-1)
    torch.testing.assert_close(lp, logp[torch.arange(n), y], rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, -expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(var, (p * logp ** 2).sum(-1) - expected_mean ** 2, rtol=0, atol=1e-10)
    assert hit.tolist() == (z.argmax(-1) == y).tolist() and hit[:5].all() and not hit.all()


def _lowest(values, k):
    return -sum(heapq.nsmallest(max(1, math.floor(len(values) * k)), values)) / max(1, math.floor(len(values) * k))


def test_attack_scores_by_formula():
    rng = np.random.default_rng(3)
    n = 13
    logprobs, entropy, var = -rng.exponential(size=n), rng.uniform(0.1, 3, n), rng.uniform(0, 2, n)
    var[2] = 1e-9  # floored at 1e-6
    stats = sample_stats.SampleStats(list(range(n)), logprobs, entropy, var, np.ones(n, bool))
    got = membership.attack_scores(stats, "The answer, twice: the answer.")
    loss = -sum(logprobs) / n
    assert got["loss"] == pytest.approx(loss, abs=1e-14)
    assert got["zlib"] == pytest.approx(loss / len(zlib.compress(b"The answer, twice: the answer.")), abs=1e-14)
    head = list(logprobs[:-1])  # without the end-of-sequence token: 12 tokens, the lowest int(4.8) = 4
    assert got["min_k"] == pytest.approx(_lowest(head, 0.4), abs=1e-14)
    normalized = [(lp + e) / math.sqrt(max(v, 1e-6)) for lp, e, v in zip(head, entropy, var)]
    assert got["min_k++"] == pytest.approx(_lowest(normalized, 0.4), abs=1e-12)
    one = sample_stats.SampleStats([1, 2], logprobs[:2], entropy[:2], var[:2], np.ones(2, bool))
    assert membership.attack_scores(one, "x")["min_k"] == pytest.approx(-logprobs[0])  # at least one token


def _trapezoid_auc(scores, labels):
    """ROC AUC by sweeping every threshold and integrating the curve (sklearn's roc_curve + auc, spelled out)."""
    thresholds = sorted(set(scores), reverse=True)
    pos, neg = sum(labels), len(labels) - sum(labels)
    points = [(0.0, 0.0)] + [(sum(s >= t and not l for s, l in zip(scores, labels)) / neg,
                              sum(s >= t and l for s, l in zip(scores, labels)) / pos) for t in thresholds]
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))


def test_auc_and_privleak_by_formula():
    rng = np.random.default_rng(5)
    forget = list(np.round(rng.normal(size=17), 1))  # rounded: ties inside and across the sets
    holdout = list(np.round(rng.normal(0.4, 1, size=9), 1))
    expected = _trapezoid_auc(forget + holdout, [0] * 17 + [1] * 9)  # open-unlearning: forget 0, holdout 1
    assert membership.auc(forget, holdout) == pytest.approx(expected, abs=1e-12)
    assert membership.auc([0, 1], [2, 3]) == 1.0 and membership.auc([1, 1], [1]) == 0.5
    # MUSE: nonmember (forget) 0, member (holdout) 1, roc_curve(y, -score); privleak relative to the retain model
    retain_forget, retain_holdout = list(rng.normal(size=17)), list(rng.normal(size=9))
    muse = _trapezoid_auc([-s for s in forget + holdout], [0] * 17 + [1] * 9)
    muse_retain = _trapezoid_auc([-s for s in retain_forget + retain_holdout], [0] * 17 + [1] * 9)
    got = membership.privleak(membership.auc(forget, holdout), membership.auc(retain_forget, retain_holdout))
    assert got == pytest.approx((muse - muse_retain) / muse_retain * 100, abs=1e-9)
    with pytest.raises(ValueError, match="both"):
        membership.auc([], [1.0])
    with pytest.raises(ValueError, match="undefined"):
        membership.privleak(0.3, 1.0)


def test_attack_columns_of_a_per_sample_file_feed_mia_auc():
    rng = np.random.default_rng(6)
    forget = {"mia_loss": list(rng.normal(size=5)), "mia_min_k": list(rng.normal(size=5)), "probability": [0.5] * 5}
    holdout = {"mia_loss": list(rng.normal(size=4)), "mia_zlib": list(rng.normal(size=4))}
    assert membership.attack_columns(forget) == {"loss": forget["mia_loss"], "min_k": forget["mia_min_k"]}
    assert membership.attack_columns({"probability": [1.0]}) == {}
    got = membership.mia_auc(membership.attack_columns(forget), membership.attack_columns(holdout))
    assert got == {"loss": membership.auc(forget["mia_loss"], holdout["mia_loss"])}  # the attack both sets hold


@pytest.mark.parametrize("hits, em, es", [
    ([1, 1, 1, 1, 0], 1.0, 1.0),  # the last (end-of-sequence) token is left out
    ([0, 1, 0, 1, 1, 1], 0.6, 0.4),  # suffix from position 3 of 5: 1 − 3/5
    ([1, 1, 0, 1], 2 / 3, 1 / 3),  # nothing reproduced from the last kept token on: open-unlearning gives 1/n
    ([1], None, 0.0),  # no answer token besides the end of sequence
])
def test_exact_memorization_and_extraction_strength_by_formula(hits, em, es):
    got_em = memorization.exact_memorization(np.array(hits, bool))
    assert got_em == (None if em is None else pytest.approx(em))
    assert memorization.extraction_strength(np.array(hits, bool)) == pytest.approx(es)


def test_extraction_strength_is_the_reproduced_suffix_share():
    rng = np.random.default_rng(7)
    for _ in range(50):
        hits = rng.random(rng.integers(2, 12)) < 0.7
        kept = list(hits[:-1])
        suffix = len(kept) - max((i + 1 for i, h in enumerate(kept) if not h), default=0)  # trailing run of hits
        expected = suffix / len(kept) if suffix else 1 / len(kept)
        assert memorization.extraction_strength(hits) == pytest.approx(expected)
        assert memorization.exact_memorization(hits) == pytest.approx(sum(kept) / len(kept))


def test_memorization_scores_of_a_model_match_its_logits():
    data, tokenizer = tiny_demo()
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=1).eval()
    pairs = data.forget[:5]
    examples = [encode_pair(tokenizer, p.question, p.answer) for p in pairs]
    got = memorization_scores(model, tokenizer, examples, batch_size=2)
    for i, ex in enumerate(examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].double()
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        logp = torch.log_softmax(logits[keep], -1)
        y = labels[keep]
        lp = logp[torch.arange(len(y)), y]
        mu = (logp.exp() * logp).sum(-1)
        sigma = ((logp.exp() * logp ** 2).sum(-1) - mu ** 2).clamp_min(1e-6).sqrt()
        text = tokenizer.decode(y.tolist(), skip_special_tokens=True)
        assert got["mia_loss"][i] == pytest.approx(-lp.mean().item(), abs=1e-5)
        assert got["mia_zlib"][i] == pytest.approx(-lp.mean().item() / len(zlib.compress(text.encode())), abs=1e-6)
        assert got["mia_min_k"][i] == pytest.approx(_lowest(lp[:-1].tolist(), 0.4), abs=1e-5)
        assert got["mia_min_k++"][i] == pytest.approx(_lowest(((lp - mu) / sigma)[:-1].tolist(), 0.4), abs=1e-4)
        hit = (logits[keep].argmax(-1) == y)[:-1]
        assert got["exact_memorization"][i] == pytest.approx(hit.double().mean().item())
