"""Question-answer pairs in the TOFU format, and their loader.

The records come from any file or folder `records.read_records` reads (JSON or JSON Lines whatever the suffix,
parquet, Arrow, ``save_to_disk`` folders, Hub-style split folders). Each record has ``question`` and ``answer``;
evaluation sets may add ``paraphrased_answer`` (a string) and ``perturbed_answer`` (a list of wrong answers, or
one string).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .records import read_records


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_truth_ratio_fields(self) -> bool:
        return self.paraphrased_answer is not None and len(self.perturbed_answers) > 0

    def to_record(self) -> dict:
        record = {"question": self.question, "answer": self.answer}
        if self.paraphrased_answer is not None:
            record["paraphrased_answer"] = self.paraphrased_answer
        if self.perturbed_answers:
            record["perturbed_answer"] = list(self.perturbed_answers)
        return record


def _text(path, index, record, key, required):
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else "not a non-empty string"
        raise DataError(f"{path}: record {index} field '{key}' is {what}")
    return value.strip()


def _record_to_pair(path, index, record) -> QAPair:
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index} is not an object")
    perturbed = record.get("perturbed_answer", [])
    if isinstance(perturbed, str):
        perturbed = [perturbed]
    if not isinstance(perturbed, list) or not all(isinstance(p, str) and p.strip() for p in perturbed):
        raise DataError(f"{path}: record {index} field 'perturbed_answer' must be a list of non-empty strings")
    return QAPair(
        question=_text(path, index, record, "question", True),
        answer=_text(path, index, record, "answer", True),
        paraphrased_answer=_text(path, index, record, "paraphrased_answer", False),
        perturbed_answers=tuple(p.strip() for p in perturbed),
    )


def load_qa(path, *, allow_empty=False) -> list[QAPair]:
    """Read TOFU-format question-answer records from a file or folder (see `records.read_records`);
    DataError with file and record on bad input."""
    path = Path(path)
    pairs = [_record_to_pair(path, i, r) for i, r in enumerate(read_records(path))]
    if not pairs and not allow_empty:
        raise DataError(f"{path}: contains no records")
    return pairs


def save_qa(pairs, path) -> None:
    """Write ``pairs`` as TOFU-format JSON (a list of records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([p.to_record() for p in pairs], indent=1, ensure_ascii=False), encoding="utf-8")


__all__ = ["DataError", "QAPair", "load_qa", "save_qa"]
