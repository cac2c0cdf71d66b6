"""A small byte-level BPE tokenizer trained on the demo texts with the ``tokenizers`` library and
wrapped as a ``transformers.PreTrainedTokenizerFast`` (so ``save_pretrained``/``from_pretrained`` work)."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def qa_texts(pairs) -> list[str]:
    """Every string of the pairs (questions, answers, paraphrases, perturbations) as training text."""
    texts = []
    for p in pairs:
        texts += [p.question, p.answer, *([p.paraphrased_answer] if p.paraphrased_answer else []),
                  *p.perturbed_answers]
    return texts


def train_tokenizer(texts, *, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; deterministic for the same texts and size."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the prompt template's words are part of every example
    bpe.train_from_iterator(["Question: Answer:"] + list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
