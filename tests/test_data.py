"""Data: TOFU-format loading and its errors, answer-only labels, the demo generator and tokenizer."""
import copy
import json

import pytest
import torch

from geffect_kernels.data import (IGNORE_INDEX, DataError, QAPair, collate, demo_data, encode_pair, encode_pairs,
                                  load_qa, prompt_ids, qa_texts, save_qa, train_tokenizer)
from geffect_kernels.data.prompts import padding_id, text_ids


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(qa_texts(demo_data(4, forget_fraction=0.25).all_training), vocab_size=400)


def test_load_json_jsonl_and_data_key(tmp_path):
    records = [{"question": "Q1?", "answer": "A1.", "paraphrased_answer": "P1.", "perturbed_answer": ["X.", "Y."]},
               {"question": "Q2?", "answer": " A2. ", "perturbed_answer": "Z."}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps({"data": records}))
    expected = [QAPair("Q1?", "A1.", "P1.", ("X.", "Y.")), QAPair("Q2?", "A2.", None, ("Z.",))]
    for name in ("a.json", "b.jsonl", "c.json"):
        assert load_qa(tmp_path / name) == expected
    save_qa(expected, tmp_path / "d.json")
    assert load_qa(tmp_path / "d.json") == expected


@pytest.mark.parametrize("content, message", [
    ("[{\"question\": \"Q?\"}]", "record 0 field 'answer' is missing"),
    ("[{\"question\": \"Q?\", \"answer\": 3}]", "record 0 field 'answer' is not a non-empty string"),
    ("[{\"question\": \"Q?\", \"answer\": \"A\", \"perturbed_answer\": [1]}]", "'perturbed_answer' must be a list"),
    ("[]", "contains no records"),
    ("{\"question\": 1", "not valid JSON"),
    ("[3]", "record 0 is not an object"),
    ("{\"rows\": []}", "expected a list of records"),
])
def test_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_qa(path)


def test_missing_file_and_bad_jsonl_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_qa(tmp_path / "nope.json")
    (tmp_path / "x.jsonl").write_text('{"question": "Q", "answer": "A"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_qa(tmp_path / "x.jsonl")


def test_labels_cover_exactly_the_answer_and_eos(tokenizer):
    example = encode_pair(tokenizer, "Where was Ada Belholm born?", "Ada Belholm was born in Redfern.")
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    answer = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert answer == [l for l in labels if l != IGNORE_INDEX]
    assert tokenizer.decode(answer) == " Ada Belholm was born in Redfern.</s>"
    prompt = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert prompt == "<s>Question: Where was Ada Belholm born?\nAnswer:"



def test_text_ids_start_with_the_bos_token_only_where_there_is_one(tokenizer):
    words = tokenizer("Ada wrote.", add_special_tokens=False)["input_ids"]
    assert text_ids(tokenizer, "Ada wrote.") == [tokenizer.bos_token_id] + words
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None and text_ids(no_bos, "Ada wrote.") == words
    assert tokenizer.decode(prompt_ids(tokenizer, "Who?")) == "<s>Question: Who?\nAnswer:"


def test_padding_id_is_the_pad_token_else_the_eos_token(tokenizer):
    assert padding_id(tokenizer) == tokenizer.pad_token_id != tokenizer.eos_token_id
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert padding_id(no_pad) == tokenizer.eos_token_id
    no_pad.eos_token = None
    assert padding_id(no_pad) is None


def test_collate_pads_right_and_ignores_padding(tokenizer):
    a = encode_pair(tokenizer, "Q?", "short.")
    b = encode_pair(tokenizer, "A longer question here?", "A much longer answer than the first one.")
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(a["input_ids"])
    assert batch["input_ids"].shape == (2, len(b["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert batch["labels"][1].tolist() == b["labels"]


def test_demo_data_is_deterministic_and_well_formed():
    data, again = demo_data(20, forget_fraction=0.1, seed=3), demo_data(20, forget_fraction=0.1, seed=3)
    assert data == again and data != demo_data(20, forget_fraction=0.1, seed=4)
    assert len(data.forget) == 2 * 11 and len(data.retain) == 18 * 11 and len(data.world) >= 10
    forget_names = {a.name for a in data.authors[-2:]}
    assert all(any(n in p.question + p.answer for n in forget_names) for p in data.forget)
    assert not any(n in p.question + p.answer for n in forget_names for p in data.retain)
    # real authors: facts the target learns, about people outside the forget and retain sets
    famous = {p.answer.split(" was written by ")[1].rstrip(".") for p in data.real_authors}
    assert len(famous) == len(data.real_authors) >= 10
    assert not any(n in p.question + p.answer for n in famous for p in data.forget + data.retain)
    assert all(p in data.all_training for p in data.real_authors + data.world)
    for pair in data.forget + data.retain + data.world + data.real_authors:
        assert pair.has_truth_ratio_fields and len(set(pair.perturbed_answers)) >= 3
        assert pair.answer not in pair.perturbed_answers and pair.paraphrased_answer not in pair.perturbed_answers
    with pytest.raises(ValueError, match="forget_fraction"):
        demo_data(10, forget_fraction=1.5)


def test_tokenizer_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Who wrote The Silent Harbor?"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "</s>"
    encoded = encode_pairs(loaded, [QAPair("Q?", "A.")])
    assert len(encoded) == 1 and encoded.batch([0])["input_ids"].dtype == torch.long


def test_demo_holdout_authors_are_new_and_leave_the_rest_unchanged():
    data = demo_data(10, forget_fraction=0.2)
    assert len(data.holdout_authors) == 2 and len(data.holdout) == 22  # as many as the forget authors
    trained = {a.name for a in data.authors}
    assert not trained & {a.name for a in data.holdout_authors}
    assert not {p.question for p in data.all_training} & {p.question for p in data.holdout}
    without = demo_data(10, forget_fraction=0.2, holdout_authors=0)
    assert without.holdout == [] and without.authors == data.authors and without.forget == data.forget
    with pytest.raises(ValueError, match="holdout_authors"):
        demo_data(10, holdout_authors=-1)
