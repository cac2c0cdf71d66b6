"""Data: TOFU-format question-answer files, prompt formatting with answer-only labels, and the
embedded demo data set (fictitious authors, real authors and world facts) with its tokenizer."""
from .demo import Author, DemoData, author_qa, demo_data, make_authors, real_authors, world_facts
from .prompts import IGNORE_INDEX, EncodedSet, collate, encode_pair, encode_pairs, format_prompt, prompt_ids
from .qa import DataError, QAPair, load_qa, save_qa
from .tokenizer import qa_texts, train_tokenizer

__all__ = ["IGNORE_INDEX", "Author", "DataError", "DemoData", "EncodedSet", "QAPair", "author_qa", "collate",
           "demo_data", "encode_pair", "encode_pairs", "format_prompt", "load_qa", "make_authors",
           "prompt_ids", "qa_texts", "real_authors", "save_qa", "train_tokenizer", "world_facts"]
