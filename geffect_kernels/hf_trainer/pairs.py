"""The training set of an unlearning Trainer: each forget example paired with a retain example, as open-unlearning's
``ForgetRetainDataset`` pairs them (anchored on the forget set: one item per forget example, the retain example
drawn at random).

The draw is a function of (seed, epoch, forget index) instead of the global random stream: the same pairs on every
rank, with any number of data-loader workers, and after a resume (nothing to restore but the epoch, which the
Trainer restores). A new epoch draws new pairs.
"""
from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

import numpy as np

from ..data.prompts import encode_pair


def _tokenized(name, i, example) -> dict:
    ids, labels = example["input_ids"], example.get("labels")
    if labels is None:
        raise ValueError(f"{name}[{i}] has input_ids but no labels (answer-only labels, -100 elsewhere)")
    if len(ids) != len(labels) or len(ids) < 2:
        raise ValueError(f"{name}[{i}]: input_ids and labels must have one length of at least 2")
    return {"input_ids": list(map(int, ids)), "labels": list(map(int, labels))}


def tokenized_examples(name, data, tokenizer=None, *, max_length=None, alternates=None) -> list[dict]:
    """``data`` as a list of tokenized examples (``input_ids`` and ``labels``, lists of ints), each with its
    substitute answer (``alternate``, tokenized alike) when it has one.

    ``data``: a list (or ``datasets``-style sequence) of examples that already have ``input_ids`` and ``labels``
    (and optionally ``alternate_input_ids``, ``alternate_labels``), or of TOFU-format records (``question``,
    ``answer``, optionally ``alternate``: a substitute answer), encoded with ``tokenizer`` as the rest of the package
    encodes them (`data.prompts.encode_pair`: answer-only labels). ``alternates``: a substitute answer per record, or
    a file of them (`data.alternates`: TOFU's ``idontknow.jsonl``). ValueError naming ``name`` otherwise."""
    if data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__getitem__"):
        raise ValueError(f"{name} must be a list or datasets-style sequence of examples, got {type(data).__name__}")
    try:
        count = len(data)
    except TypeError:
        raise ValueError(f"{name} must have a length (a list or a datasets.Dataset)") from None
    if count == 0:
        raise ValueError(f"{name} is empty")
    examples = [data[i] for i in range(count)]
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise ValueError(f"{name}[{i}] is a {type(example).__name__}, not a dict of fields")
        if not ("input_ids" in example or "question" in example and "answer" in example):
            raise ValueError(f"{name}[{i}] has neither input_ids and labels nor question and answer "
                             f"(keys: {', '.join(sorted(map(str, example))) or 'none'})")
    substitutes = _substitutes(name, examples, alternates)
    out = []
    for i, example in enumerate(examples):
        if "input_ids" in example:
            encoded = _tokenized(name, i, example)
            if "alternate_input_ids" in example:
                encoded["alternate"] = _tokenized(f"{name} (alternate_*)", i, {
                    "input_ids": example["alternate_input_ids"], "labels": example.get("alternate_labels")})
        else:
            if tokenizer is None:
                raise ValueError(f"{name} holds question/answer records: pass the tokenizer (processing_class=)")
            question = str(example["question"])
            encoded = encode_pair(tokenizer, question, str(example["answer"]), max_length=max_length)
            substitute = substitutes[i] if substitutes is not None else example.get("alternate")
            if substitute is not None:
                encoded["alternate"] = encode_pair(tokenizer, question, str(substitute), max_length=max_length)
        out.append(encoded)
    return out


def _substitutes(name, examples, alternates):
    """One substitute answer per record from ``alternates`` (a list, or a file), or None."""
    if alternates is None:
        return None
    if any("question" not in e for e in examples):
        raise ValueError(f"alternates: substitute answers are encoded with the questions; {name} must hold "
                         f"question/answer records (tokenized examples carry alternate_input_ids instead)")
    if isinstance(alternates, (str, PathLike)):
        from ..data.alternates import alternate_answers
        from ..data.errors import DataError

        try:
            return alternate_answers(alternates, [str(e["question"]) for e in examples])
        except DataError as err:
            raise ValueError(f"alternates: {err}") from None
    answers = list(alternates)
    if len(answers) != len(examples) or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"alternates must be a file or {len(examples)} non-empty strings (one per record of {name})")
    return answers


def retain_index(seed: int, epoch: int, forget_index: int, retain_size: int) -> int:
    """The retain example paired with forget example ``forget_index`` in ``epoch``."""
    return int(np.random.default_rng([seed, epoch, forget_index]).integers(retain_size))


class ForgetRetainPairs:
    """Item i: ``{"forget": forget example i (with its "index"), "retain": a retain example}`` (no "retain" without a
    retain set). `set_epoch` picks the epoch's pairing."""

    def __init__(self, forget: list[dict], retain: list[dict] | None, seed: int = 0):
        self.forget, self.retain, self.seed = forget, retain, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, index):
        index = int(index)
        item = {"forget": {**self.forget[index], "index": index}}
        if self.retain:
            item["retain"] = self.retain[retain_index(self.seed, self.epoch, index, len(self.retain))]
        return item
