"""Data: records from the files data sets are published as (JSON, JSON Lines, parquet, Arrow, saved datasets),
TOFU-format question-answer pairs, prompt formatting with answer-only labels, and the embedded demo data set
(fictitious authors, real authors and world facts) with its tokenizer."""
from .demo import Author, DemoData, author_qa, demo_data, make_authors, real_authors, world_facts
from .errors import DataError
from .prompts import (IGNORE_INDEX, EncodedSet, collate, encode_pair, encode_pairs, encode_text, format_prompt,
                      prompt_ids)
from .qa import QAPair, load_qa, save_qa
from .records import read_records
from .tokenizer import qa_texts, train_tokenizer

__all__ = ["IGNORE_INDEX", "Author", "DataError", "DemoData", "EncodedSet", "QAPair", "author_qa", "collate",
           "demo_data", "encode_pair", "encode_pairs", "encode_text", "format_prompt", "load_qa", "make_authors",
           "prompt_ids", "qa_texts", "read_records", "real_authors", "save_qa", "train_tokenizer", "world_facts"]
