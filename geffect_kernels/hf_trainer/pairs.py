"""The training set of an unlearning Trainer: each forget example paired with a retain example, as open-unlearning's
``ForgetRetainDataset`` pairs them (anchored on the forget set: one item per forget example, the retain example
drawn at random).

The draw is a function of (seed, epoch, forget index) instead of the global random stream: the same pairs on every
rank, with any number of data-loader workers, and after a resume (nothing to restore but the epoch, which the
Trainer restores). A new epoch draws new pairs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..data.prompts import encode_pair


def tokenized_examples(name, data, tokenizer=None, *, max_length=None) -> list[dict]:
    """``data`` as a list of tokenized examples (``input_ids`` and ``labels``, lists or 1-D tensors of ints).

    ``data``: a list (or ``datasets``-style sequence) of examples that already have ``input_ids`` and ``labels``,
    or of TOFU-format records (``question``, ``answer``), encoded with ``tokenizer`` as the rest of the package
    encodes them (`data.prompts.encode_pair`: answer-only labels). ValueError naming ``name`` otherwise."""
    if data is None or not isinstance(data, Sequence) and not hasattr(data, "__getitem__"):
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
        if "input_ids" in example:
            if "labels" not in example:
                raise ValueError(f"{name}[{i}] has input_ids but no labels (answer-only labels, -100 elsewhere)")
            if len(example["input_ids"]) != len(example["labels"]) or len(example["input_ids"]) < 2:
                raise ValueError(f"{name}[{i}]: input_ids and labels must have one length of at least 2")
            continue
        if "question" in example and "answer" in example:
            if tokenizer is None:
                raise ValueError(f"{name} holds question/answer records: pass the tokenizer (processing_class=)")
            examples[i] = encode_pair(tokenizer, str(example["question"]), str(example["answer"]),
                                      max_length=max_length)
            continue
        raise ValueError(f"{name}[{i}] has neither input_ids and labels nor question and answer "
                         f"(keys: {', '.join(sorted(map(str, example))) or 'none'})")
    return [{"input_ids": list(map(int, e["input_ids"])), "labels": list(map(int, e["labels"]))} for e in examples]


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
