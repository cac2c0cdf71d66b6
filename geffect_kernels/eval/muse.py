"""MUSE's three metrics (Shi et al., 2024; ``swj0419/muse_bench``: ``eval.py`` and ``metrics/``) on files in
MUSE's layout.

- **verbmem** (``metrics/verbmem.py``): greedy continuation (128 new tokens) of each ``verbmem/forget`` prompt,
  ROUGE-L F1 (``rouge-score``, no stemming) against the true continuation cut to its first 128 tokens; mean × 100.
- **knowmem** (``metrics/knowmem.py``): each question after the in-context examples (``Question: q\\nAnswer: a``
  blocks joined by blank lines), greedy answer (32 new tokens) cut at the first ``"\\n\\n"``, ``"\\nQuestion"`` or
  ``"Question:"``, ROUGE-L F1 against the answer; mean × 100, on the forget QA (``knowmem_f``) and the retain QA
  (``knowmem_r``, utility).
- **privleak** (``metrics/privleak.py``, ``eval.py``): the min-k% attack (k = 0.4) on the ``privleak/forget``
  and ``privleak/holdout`` texts, AUC, and (AUC' − AUC'_retain) / AUC'_retain × 100 relative to the retain model
  (see `membership`). MUSE's own code divides by a fixed retrained model's AUC per corpus; here it is the retain
  model given. The other attacks' AUCs come along in ``mia_auc``.

The layout: ``ROOT/verbmem/forget``, ``ROOT/knowmem/{forget_qa,forget_qa_icl,retain_qa,retain_qa_icl}``,
``ROOT/privleak/{forget,holdout}``, each a split `data.read_records` finds: MUSE's GitHub ``data/news`` files
(``forget.json``: a list of records, or of strings for privleak) or the Hub's parquet shards
(``verbmem/forget-00000-of-00001.parquet``). A part that is absent (MUSE-Books has no knowmem) is reported missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data import DataError, encode_text, read_records
from ..data.prompts import text_ids  # as MUSE tokenizes, with special tokens: the BOS token first
from ..model_mode import eval_mode
from .likelihood import greedy_continuations, memorization_scores
from .membership import PRIVLEAK_ATTACK, attack_columns, mia_auc, privleak

VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_f1(reference: str, candidate: str) -> float:
    """ROUGE-L F1 without stemming, as MUSE's ``RougeEvalLogger`` reports ``rougeL``."""
    return float(_scorer().score(reference, candidate)["rougeL"].fmeasure)


@dataclass(frozen=True)
class MuseData:
    verbmem_forget: list | None = None  # [{"prompt", "gt"}]
    knowmem_forget_qa: list | None = None  # [{"question", "answer"}]
    knowmem_forget_qa_icl: list | None = None
    knowmem_retain_qa: list | None = None
    knowmem_retain_qa_icl: list | None = None
    privleak_forget: list | None = None  # [str]
    privleak_holdout: list | None = None


def _records(root: Path, part: str, split: str, fields):
    try:
        records = read_records(root / part / split)
    except DataError as err:
        if "no such file, folder or split" in str(err):
            return None
        raise
    out = []
    for i, record in enumerate(records):
        if isinstance(record, str) and fields == ("text",):
            record = {"text": record}
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in fields):
            raise DataError(f"{root / part / split}: record {i} needs the string fields {', '.join(fields)}")
        out.append(record["text"] if fields == ("text",) else {f: record[f] for f in fields})
    return out


def load_muse(root) -> MuseData:
    """The MUSE parts found under ``root`` (a corpus folder: MUSE's ``data/news`` or the Hub's ``MUSE-News``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (a MUSE corpus folder holds verbmem/, knowmem/, privleak/)")
    qa = ("question", "answer")
    data = MuseData(verbmem_forget=_records(root, "verbmem", "forget", ("prompt", "gt")),
                    knowmem_forget_qa=_records(root, "knowmem", "forget_qa", qa),
                    knowmem_forget_qa_icl=_records(root, "knowmem", "forget_qa_icl", qa),
                    knowmem_retain_qa=_records(root, "knowmem", "retain_qa", qa),
                    knowmem_retain_qa_icl=_records(root, "knowmem", "retain_qa_icl", qa),
                    privleak_forget=_records(root, "privleak", "forget", ("text",)),
                    privleak_holdout=_records(root, "privleak", "holdout", ("text",)))
    if all(v is None for v in vars(data).values()):
        raise DataError(f"{root}: none of verbmem/forget, knowmem/forget_qa, privleak/forget found")
    return data


def verbmem(model, tokenizer, records, *, max_new_tokens=VERBMEM_MAX_NEW_TOKENS, batch_size=16):
    """``(mean ROUGE-L F1 × 100, per-sample rows)`` of the continuations of ``records`` (``prompt``, ``gt``)."""
    outputs = greedy_continuations(model, tokenizer, [text_ids(tokenizer, r["prompt"]) for r in records],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    truths = tokenizer.batch_decode([text_ids(tokenizer, r["gt"])[:max_new_tokens] for r in records],
                                    skip_special_tokens=True)
    rows = [{"gt": gt, "response": out, "rougeL": rouge_l_f1(gt, out)} for gt, out in zip(truths, outputs)]
    return float(np.mean([r["rougeL"] for r in rows]) * 100), rows


def knowmem_prompt(question, icl=()) -> str:
    return "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl) + \
        f"Question: {question}\nAnswer: "


def cut_at_stops(text: str, stops=KNOWMEM_STOPS) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def knowmem(model, tokenizer, qa, icl=(), *, max_new_tokens=KNOWMEM_MAX_NEW_TOKENS, batch_size=16):
    """``(mean ROUGE-L F1 × 100, per-sample rows)`` of the few-shot answers to ``qa`` (``question``, ``answer``)."""
    prompts = [text_ids(tokenizer, knowmem_prompt(r["question"], icl)) for r in qa]
    outputs = [cut_at_stops(o) for o in greedy_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                             batch_size=batch_size, strip=False)]
    rows = [{"question": r["question"], "gt": r["answer"], "response": out, "rougeL": rouge_l_f1(r["answer"], out)}
            for r, out in zip(qa, outputs)]
    return float(np.mean([r["rougeL"] for r in rows]) * 100), rows


def text_memorization_scores(model, tokenizer, texts, *, batch_size=8) -> dict:
    """Membership scores of whole texts (every token after the BOS, as many as the model has positions for)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return memorization_scores(model, tokenizer, [encode_text(tokenizer, t, max_length=limit) for t in texts],
                               batch_size=batch_size)


def _first(items, size):
    """The first ``size`` items (all when ``size`` is None)."""
    return items if items is None or size is None else items[:size]


def privleak_scores(model, tokenizer, data: MuseData, *, size=None) -> dict | None:
    """Per-sample membership scores on the privleak forget and holdout texts (None without them)."""
    if not (data.privleak_forget and data.privleak_holdout):
        return None
    return {"forget": text_memorization_scores(model, tokenizer, _first(data.privleak_forget, size)),
            "holdout": text_memorization_scores(model, tokenizer, _first(data.privleak_holdout, size))}


def privleak_auc(scores) -> dict:
    """``{attack: AUC}`` from `privleak_scores`."""
    return mia_auc(attack_columns(scores["forget"]), attack_columns(scores["holdout"]))


def evaluate_muse(model, tokenizer, data: MuseData, *, retain_model_mia_auc=None, size=None):
    """``(summary, per_sample)``: ``verbmem_f``, ``knowmem_f``, ``knowmem_r`` (× 100), ``mia_auc`` and
    ``privleak`` where their parts (and the retain model's ``mia_auc``) are given; ``missing`` says why not.
    ``size``: the first N items of each part."""
    summary, per_sample, missing = {}, {}, {}
    with eval_mode(model):
        if data.verbmem_forget:
            summary["verbmem_f"], per_sample["verbmem_f"] = verbmem(model, tokenizer, _first(data.verbmem_forget, size))
        else:
            missing["verbmem_f"] = "no verbmem/forget"
        for key, qa, icl in (("knowmem_f", data.knowmem_forget_qa, data.knowmem_forget_qa_icl),
                             ("knowmem_r", data.knowmem_retain_qa, data.knowmem_retain_qa_icl)):
            if qa:
                summary[key], per_sample[key] = knowmem(model, tokenizer, _first(qa, size), icl or ())
            else:
                missing[key] = f"no knowmem/{'forget' if key == 'knowmem_f' else 'retain'}_qa"
        scores = privleak_scores(model, tokenizer, data, size=size)
        if scores is None:
            missing["mia_auc"] = missing["privleak"] = "no privleak/forget and privleak/holdout texts"
        else:
            per_sample["privleak"] = scores
            try:
                summary["mia_auc"] = privleak_auc(scores)
                if retain_model_mia_auc is None:
                    missing["privleak"] = "no retain model's MUSE AUC was given"
                else:
                    summary["privleak"] = privleak(summary["mia_auc"][PRIVLEAK_ATTACK],
                                                   retain_model_mia_auc[PRIVLEAK_ATTACK])
            except ValueError as err:  # NaN scores, or a retain model's AUC that leaves nothing to divide by
                if "mia_auc" not in summary:
                    missing["mia_auc"] = str(err)
                missing["privleak"] = str(err)
    if missing:
        summary["missing"] = missing
    return summary, per_sample


__all__ = ["KNOWMEM_MAX_NEW_TOKENS", "MuseData", "VERBMEM_MAX_NEW_TOKENS", "cut_at_stops", "evaluate_muse",
           "knowmem", "knowmem_prompt", "load_muse", "privleak_auc", "privleak_scores", "rouge_l_f1",
           "text_memorization_scores", "verbmem"]
