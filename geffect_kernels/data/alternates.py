"""Substitute answers for the forget questions (PO, DPO): TOFU's refusal list, or an answer per question.

Two formats, told apart by their content:

- a list of refusals, one per line, as TOFU publishes ``data/idontknow.jsonl`` (plain text despite its name; a
  line that is a JSON string is read as that string): each question gets one, drawn with a seeded generator, so a
  run's pairs are the same every time (open-unlearning's ``QAwithIdkDataset`` draws a new one at every access);
- TOFU-format records (`qa.load_qa`: ``question`` and ``answer``), an answer for every forget question.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..structured_files import UnreadableFile, read_text
from .errors import DataError
from .qa import load_qa


def _lines(path: Path) -> list[str]:
    try:
        text = read_text(path)
    except UnreadableFile as err:
        raise DataError(f"{path}: cannot read the substitute answers ({err.reason})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _is_records(lines: list[str]) -> bool:
    """Whether the file holds JSON objects (TOFU records) rather than one refusal per line."""
    if not lines:
        return False
    if lines[0].startswith("["):
        return True
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False
    except RecursionError:  # nested deeply: JSON all the same, which the records' reader refuses in one line
        return True


def _refusal(line: str) -> str:
    if line.startswith('"'):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return line
        return value.strip() if isinstance(value, str) else line
    return line


def alternate_answers(path, questions, *, seed: int = 0) -> list[str]:
    """A substitute answer for each of ``questions``, read from ``path``; DataError when the file has none, or
    (records) when a question has no answer there."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: the substitute answers are a file (a refusal per line, or TOFU records)")
    lines = _lines(path)
    if _is_records(lines):
        answers = {pair.question: pair.answer for pair in load_qa(path)}
        missing = [q for q in questions if q not in answers]
        if missing:
            raise DataError(f"{path}: no answer for forget question {missing[0]!r} ({len(missing)} of "
                            f"{len(questions)} missing)")
        return [answers[q] for q in questions]
    refusals = [r for r in (_refusal(line) for line in lines) if r]
    if not refusals:
        raise DataError(f"{path}: holds no substitute answers (expected a refusal per line, or TOFU records)")
    rng = random.Random(seed)
    return [refusals[rng.randrange(len(refusals))] for _ in questions]


def with_alternates(encoded, path, *, seed: int = 0):
    """``encoded`` (an `EncodedSet` from `encode_pairs`) with the substitute answers of ``path``."""
    if encoded.questions is None:
        raise ValueError("substitute answers need the forget set's questions: encode it with encode_pairs")
    return encoded.with_alternates(alternate_answers(path, encoded.questions, seed=seed))
