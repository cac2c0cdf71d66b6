"""Prompt formatting with answer-only labels, and batching.

A pair becomes ``<bos>Question: {q}\\nAnswer: {a}<eos>``. The prompt and the answer are tokenized
separately and concatenated, so the boundary is exact whatever the tokenizer merges; labels copy the
answer tokens (and the end-of-sequence token) and are `IGNORE_INDEX` on the prompt and on padding. Labels are
aligned with ``input_ids`` (Hugging Face convention: the loss functions shift them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..catalog import IGNORE_INDEX


def format_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer has a BOS token, else ``[]``."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` after the BOS token when the tokenizer has one (no EOS): what generation starts from."""
    return bos_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt (with the BOS token when the tokenizer has one): what generation starts from."""
    return text_ids(tokenizer, format_prompt(question))


def padding_id(tokenizer) -> int | None:
    """The id batches are padded with: the pad token's, else the EOS token's (None when it has neither)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, question: str, answer: str, *, max_length: int | None = None) -> dict:
    """``input_ids`` and answer-only ``labels`` (lists of ints) for one question and one answer."""
    prompt = prompt_ids(tokenizer, question)
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if max_length is not None and len(prompt) + len(answer_ids) > max_length:
        keep = max_length - len(prompt)
        if keep < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the answer to {question!r}")
        answer_ids = answer_ids[:keep]
    return {"input_ids": prompt + answer_ids, "labels": [IGNORE_INDEX] * len(prompt) + answer_ids}


def encode_text(tokenizer, text: str, *, max_length: int | None = None) -> dict:
    """A plain text scored whole (MUSE's privleak and verbmem texts): ``<bos>`` text ``<eos>``, every token
    after the BOS labeled."""
    bos = bos_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    if max_length is not None:
        ids = ids[:max_length - len(bos)]
    labels = ([IGNORE_INDEX] * len(bos) + ids) if bos else [IGNORE_INDEX] + ids[1:]
    return {"input_ids": bos + ids, "labels": labels}


@dataclass
class EncodedSet:
    """Encoded examples plus the padding id: indexable by sample, batchable by index list.

    ``alternates``: each question again with a substitute answer (PO, DPO), batched beside the examples under
    ``alternate_*`` keys (`objective_inputs.side`); ``questions``, ``tokenizer`` and ``max_length``: what
    `with_alternates` needs to encode them later.
    """

    examples: list[dict]
    pad_id: int
    alternates: list[dict] | None = None
    questions: list[str] | None = None
    tokenizer: object = field(default=None, repr=False, compare=False)
    max_length: int | None = None

    def __len__(self):
        return len(self.examples)

    def batch(self, indices) -> dict:
        batch = collate([self.examples[i] for i in indices], self.pad_id)
        if self.alternates is not None:
            alternate = collate([self.alternates[i] for i in indices], self.pad_id)
            batch.update({"alternate_" + k: v for k, v in alternate.items()})
        return batch

    def alternate_set(self) -> EncodedSet:
        """The substitute answers as a set of their own."""
        if self.alternates is None:
            raise ValueError("this set has no substitute answers")
        return EncodedSet(self.alternates, self.pad_id)

    def with_alternates(self, answers) -> EncodedSet:
        """This set with ``answers[i]`` as the substitute answer of question i."""
        if self.questions is None or self.tokenizer is None:
            raise ValueError("substitute answers need the set's questions and tokenizer: encode it with encode_pairs")
        if len(answers) != len(self.examples):
            raise ValueError(f"{len(answers)} substitute answers for {len(self.examples)} questions")
        alternates = [encode_pair(self.tokenizer, q, a, max_length=self.max_length)
                      for q, a in zip(self.questions, answers)]
        return replace(self, alternates=alternates)


def encode_pairs(tokenizer, pairs, *, field: str = "answer", max_length: int | None = None,
                 alternates=None) -> EncodedSet:
    """Encode every pair with the answer taken from ``field`` (``answer`` or ``paraphrased_answer``);
    ``alternates``: a substitute answer per pair (PO, DPO)."""
    pairs = list(pairs)
    examples = [encode_pair(tokenizer, p.question, getattr(p, field), max_length=max_length) for p in pairs]
    pad = padding_id(tokenizer)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    encoded = EncodedSet(examples, pad, questions=[p.question for p in pairs], tokenizer=tokenizer,
                         max_length=max_length)
    return encoded if alternates is None else encoded.with_alternates(list(alternates))


def collate(examples, pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors for a list of examples."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
