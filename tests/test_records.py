"""Data as published: TOFU's JSON Lines in .json files, parquet, Arrow, save_to_disk folders and Hub-style split
folders (TOFU's and MUSE's layouts), written here by the tests themselves."""
import json

import pytest

from geffect_kernels.data import DataError, QAPair, load_qa
from geffect_kernels.data.records import read_records

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

RECORDS = [{"question": "Who wrote X?", "answer": "X was written by A.", "perturbed_answer": ["B wrote X.", "C."]},
           {"question": "Capital of Y?", "answer": "Z.", "perturbed_answer": ["W.", "V."]},
           {"question": "Q3?", "answer": "A3.", "paraphrased_answer": "P3.", "perturbed_answer": ["N3."]}]


def _filled(records):
    """The records as a table gives them back: every column in every row, None where a record lacks it."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return [{k: r.get(k) for k in keys} for r in records]


def _table(records):
    return pa.Table.from_pylist(_filled(records))


def _save_to_disk(folder, records, shards=1):
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow IPC streams plus state.json listing them."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    size = -(-len(records) // shards)
    for i, name in enumerate(names):
        table = _table(records[i * size:(i + 1) * size])
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def test_json_lines_in_a_json_file_and_json_in_a_jsonl_file(tmp_path):
    # TOFU's real_authors_perturbed.json: JSON Lines under a .json suffix
    (tmp_path / "real_authors_perturbed.json").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    (tmp_path / "array.jsonl").write_text(json.dumps(RECORDS, indent=2))
    assert read_records(tmp_path / "real_authors_perturbed.json") == RECORDS
    assert read_records(tmp_path / "array.jsonl") == RECORDS
    pairs = load_qa(tmp_path / "real_authors_perturbed.json")
    assert pairs[0] == QAPair("Who wrote X?", "X was written by A.", None, ("B wrote X.", "C."))
    (tmp_path / "bad.json").write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("not json at all\n")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(tmp_path / "garbage.json")


def test_parquet_file_and_tofu_hub_layout(tmp_path):
    pq.write_table(_table(RECORDS), tmp_path / "forget10_perturbed.parquet")
    assert read_records(tmp_path / "forget10_perturbed.parquet") == _filled(RECORDS)
    # TOFU on the Hub: one folder per configuration, train-0000x-of-0000n.parquet shards inside
    config = tmp_path / "TOFU" / "real_authors_perturbed"
    config.mkdir(parents=True)
    pq.write_table(_table(RECORDS[:2]), config / "train-00000-of-00002.parquet")
    pq.write_table(_table(RECORDS[2:]), config / "train-00001-of-00002.parquet")
    assert read_records(config) == _filled(RECORDS[:2]) + _filled(RECORDS[2:])
    assert read_records(config / "train") == read_records(config)
    assert [p.question for p in load_qa(config)] == [r["question"] for r in RECORDS]


def test_muse_hub_layout_names_splits(tmp_path):
    knowmem = tmp_path / "MUSE-News" / "knowmem"
    knowmem.mkdir(parents=True)
    qa = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    pq.write_table(_table(qa), knowmem / "forget_qa-00000-of-00001.parquet")
    pq.write_table(_table(qa[:1]), knowmem / "retain_qa-00000-of-00001.parquet")
    assert read_records(knowmem / "forget_qa") == qa
    assert read_records(knowmem / "retain_qa") == qa[:1]
    with pytest.raises(DataError, match="holds the splits forget_qa, retain_qa"):
        read_records(knowmem)
    with pytest.raises(DataError, match="no such file, folder or split"):
        read_records(knowmem / "holdout")
    # a data/ folder below the configuration, as some Hub repositories keep it
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    (data / "holdout.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("a b", "c d")))
    assert read_records(tmp_path / "hub" / "holdout") == [{"text": "a b"}, {"text": "c d"}]
    assert read_records(tmp_path / "hub") == [{"text": "a b"}, {"text": "c d"}]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    _save_to_disk(tmp_path / "ds", RECORDS, shards=2)
    assert read_records(tmp_path / "ds") == _filled(RECORDS[:2]) + _filled(RECORDS[2:])
    assert load_qa(tmp_path / "ds")[2] == QAPair("Q3?", "A3.", "P3.", ("N3.",))
    root = tmp_path / "dd"
    _save_to_disk(root / "train", RECORDS)
    _save_to_disk(root / "test", RECORDS[:1])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_records(root) == _filled(RECORDS)  # the train split when several
    assert read_records(root / "test") == _filled(RECORDS[:1])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["a", "b"]}))
    with pytest.raises(DataError, match="holds the splits a, b"):
        read_records(root)
    (tmp_path / "broken.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="not a readable Arrow file"):
        read_records(tmp_path / "broken.arrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without data files"):
        read_records(tmp_path / "empty")
