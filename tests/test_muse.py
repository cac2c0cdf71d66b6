"""MUSE's verbmem, knowmem and privleak on small files in MUSE's two layouts (its GitHub data/news JSON files and the
Hub's parquet shards), against generations, ROUGE and AUCs computed here independently."""
import json
import re

import numpy as np
import pytest
import torch

from geffect_kernels.data import DataError
from geffect_kernels.eval.muse import evaluate_muse, load_muse
from geffect_kernels.train import tiny_llama
from demo_cases import tiny_demo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    data, tokenizer = tiny_demo()
    model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, intermediate_size=64, seed=2,
                       max_positions=512).eval()
    return data, tokenizer, model


def _greedy(model, tokenizer, text, n):
    """Token-by-token argmax from ``<bos> text``, decoded without special tokens (MUSE generates one by one)."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    start = len(ids)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def _rouge_l_f1(reference, candidate):
    """rouge-score's ROUGE-L F1 without stemming: lower-case alphanumeric tokens, LCS, harmonic mean of P and R."""
    ref, cand = (re.sub(r"[^a-z0-9]+", " ", t.lower()).split() for t in (reference, candidate))
    if not ref or not cand:
        return 0.0
    table = [[0] * (len(cand) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref):
        for j, c in enumerate(cand):
            table[i + 1][j + 1] = table[i][j] + 1 if r == c else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _write_layout(root, parts, hub):
    for (part, split), records in parts.items():
        folder = root / part
        folder.mkdir(parents=True, exist_ok=True)
        if hub:
            pa = pytest.importorskip("pyarrow")
            import pyarrow.parquet as pq
            rows = [{"text": r} if isinstance(r, str) else r for r in records]
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
        else:
            (folder / f"{split}.json").write_text(json.dumps(records))


@pytest.mark.parametrize("hub", [False, True])
def test_muse_metrics_on_both_layouts(tiny, tmp_path, hub):
    data, tokenizer, model = tiny
    prompts = [p.question for p in data.forget[:3]]
    # true continuations that share words with what the model says, so ROUGE is not trivially 0
    said = [_greedy(model, tokenizer, p, 6) for p in prompts]
    gts = [f"{s} and then more words" for s in said]
    questions = [p.question for p in data.retain[:3]]
    icl = [{"question": p.question, "answer": p.answer} for p in data.retain[3:5]]
    prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    answers = [_greedy(model, tokenizer, f"{prefix}Question: {q}\nAnswer: ", 4) for q in questions]
    answers = [re.split(r"\n\n|\nQuestion|Question:", a)[0] + " extra" for a in answers]
    texts = [p.answer for p in data.forget[:4]], [p.answer for p in data.retain[:5]]
    qa = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    _write_layout(tmp_path, {("verbmem", "forget"): [{"prompt": p, "gt": g} for p, g in zip(prompts, gts)],
                             ("knowmem", "forget_qa"): qa,
                             ("knowmem", "forget_qa_icl"): icl,
                             ("privleak", "forget"): texts[0], ("privleak", "holdout"): texts[1]}, hub)
    muse = load_muse(tmp_path)
    assert muse.knowmem_retain_qa is None and muse.privleak_forget == texts[0]
    summary, per_sample = evaluate_muse(model, tokenizer, muse, retain_model_mia_auc={"min_k": 0.4})
    # verbmem: 128 new tokens against the truth's first 128 tokens (all of these short ones)
    continuations = [_greedy(model, tokenizer, p, 128) for p in prompts]
    assert [r["response"] for r in per_sample["verbmem_f"]] == [c.strip() for c in continuations]
    expected = [_rouge_l_f1(g, c) for g, c in zip(gts, continuations)]
    assert max(expected) > 0 and summary["verbmem_f"] == pytest.approx(100 * np.mean(expected), abs=1e-9)
    replies = [re.split(r"\n\n|\nQuestion|Question:", _greedy(model, tokenizer, f"{prefix}Question: {q}\nAnswer: ",
                                                               32))[0] for q in questions]
    assert [r["response"] for r in per_sample["knowmem_f"]] == replies  # prompt, length, cut at the stops
    expected = [_rouge_l_f1(a, r) for a, r in zip(answers, replies)]
    assert summary["knowmem_f"] == pytest.approx(100 * np.mean(expected), abs=1e-9)
    assert "knowmem_r" in summary["missing"] and "knowmem_r" not in summary
    forget, holdout = per_sample["privleak"]["forget"]["mia_min_k"], per_sample["privleak"]["holdout"]["mia_min_k"]
    auc = np.mean([(h > f) + 0.5 * (h == f) for f in forget for h in holdout])
    assert summary["mia_auc"]["min_k"] == pytest.approx(auc)
    assert summary["privleak"] == pytest.approx(((1 - auc) - 0.6) / 0.6 * 100)


def test_muse_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_muse(tmp_path / "absent")
    with pytest.raises(DataError, match="none of verbmem/forget"):
        load_muse(tmp_path)
    (tmp_path / "verbmem").mkdir()
    (tmp_path / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "p"}]))
    with pytest.raises(DataError, match="record 0 needs the string fields prompt, gt"):
        load_muse(tmp_path)
