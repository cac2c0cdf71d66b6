"""Files from outside (data sets, settings, run folders, model folders, evaluation logs) crafted or broken: each is
refused with one line that names it, and none runs code, crashes the process or reads outside its folder."""
import json
import os

import pytest

from geffect_kernels.data import DataError, read_records
from geffect_kernels.structured_files import UnreadableFile, read_json, read_yaml

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # the parsers recursed into this until RecursionError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def _deep_readers(tmp_path):
    """(what, the file written deep, a call that reads it) for every place JSON or YAML is read."""
    from geffect_kernels.cli.inputs import check_model_dir
    from geffect_kernels.eval.retain_reference import read_retain_reference
    from geffect_kernels.eval.run_files import read_json as report_json
    from geffect_kernels.geffect.result import GEffectHistory
    from geffect_kernels.train.hf_shards import weight_files
    from geffect_kernels.train.lora import load_adapter
    from geffect_kernels.train.memory_plan import ModelShape
    from geffect_kernels.train.sharded_checkpoint import _read_json as checkpoint_json

    t = tmp_path
    return [
        ("--config", _write(t / "config.yaml", "a: " + "[" * 5000), lambda p: read_yaml(p)),
        ("--forget (JSON)", _write(t / "forget.json", DEEP_JSON), read_records),
        ("--forget (JSON Lines)", _write(t / "lines.jsonl", '{"a": 1}\n' + DEEP_JSON + "\n"), read_records),
        ("--forget (deep but parseable)", _write(t / "nested.json", "[" * 500 + "]" * 500), read_records),
        ("state.json", _write(t / "saved" / "state.json", DEEP_JSON), lambda p: read_records(p.parent)),
        ("dataset_dict.json", _write(t / "dict" / "dataset_dict.json", DEEP_JSON), lambda p: read_records(p.parent)),
        ("MUSE split", _write(t / "muse" / "knowmem" / "forget_qa.json", DEEP_JSON),
         lambda p: read_records(p.parent / "forget_qa")),
        ("report's files", _write(t / "results" / "summary.json", DEEP_JSON), report_json),
        ("geffects.json", _write(t / "run" / "geffects.json", DEEP_JSON), GEffectHistory.from_json),
        ("loop.json", _write(t / "step-1" / "loop.json", DEEP_JSON), checkpoint_json),
        ("model config.json", _write(t / "model" / "config.json", DEEP_JSON), lambda p: check_model_dir(p.parent)),
        ("memory plan config.json", _write(t / "plan" / "config.json", DEEP_JSON), ModelShape.from_config),
        ("adapter_config.json", _write(t / "adapter" / "adapter_config.json", DEEP_JSON),
         lambda p: load_adapter(p.parent, lambda base: None)),
        ("weights index", _write(t / "sharded" / "model.safetensors.index.json", DEEP_JSON),
         lambda p: weight_files(p.parent)),
        ("--retain-eval", _write(t / "eval_log_forget.json", DEEP_JSON), read_retain_reference),
    ]


def test_deep_nesting_is_one_line_naming_the_file_wherever_json_or_yaml_is_read(tmp_path):
    for what, path, read in _deep_readers(tmp_path):
        with pytest.raises(ValueError) as refused:
            read(path)
        message = str(refused.value)
        assert str(path) in message and "nested more than" in message and "\n" not in message, (what, message)


def test_deep_lines_of_a_run_folder_are_skipped_not_a_traceback(tmp_path):
    from geffect_kernels.train.checkpoint import _has_objective
    from geffect_kernels.train.loop import _read_metrics

    metrics = _write(tmp_path / "metrics.jsonl", '{"step": 1, "loss": 0.5}\n' + DEEP_JSON + "\n")
    assert _read_metrics(metrics, 5) == [{"step": 1, "loss": 0.5}]
    assert _has_objective(_write(tmp_path / "config.json", DEEP_JSON)) is False


def test_deep_nesting_through_the_cli_is_one_line(capsys, tmp_path):
    from test_cli import run

    config = _write(tmp_path / "deep.yaml", "steps: " + "[" * 5000)
    code, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and f"{config}: nested more than" in err, err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_are_refused_not_waited_on_or_read_forever(tmp_path):
    fifo = tmp_path / "forget.json"
    os.mkfifo(fifo)
    for read in (read_records, read_json, read_yaml):
        with pytest.raises(ValueError, match=f"{fifo}: a FIFO, not a regular file"):
            read(fifo)
    if os.path.exists("/dev/zero"):
        for read in (read_records, read_json, read_yaml):
            with pytest.raises(ValueError, match="/dev/zero: a character device, not a regular file"):
                read("/dev/zero")
    folder = tmp_path / "saved"
    folder.mkdir()
    os.mkfifo(folder / "state.json")
    with pytest.raises(DataError, match="state.json: a FIFO"):
        read_records(folder)


def test_invalid_utf8_names_the_file(tmp_path):
    from geffect_kernels.eval.retain_reference import read_retain_reference
    from geffect_kernels.eval.run_files import read_json as report_json

    bad = _write(tmp_path / "eval.json", b'{"a": "\xff"}')
    for read in (read_records, read_json, report_json, read_retain_reference):
        with pytest.raises(ValueError, match=f"{bad}: not UTF-8 text"):
            read(bad)


@pytest.mark.parametrize("splits, message", [
    (5, "'splits' must be a list of split names, got '5'"),
    ("train", "'splits' must be a list of split names"),
    ([1, 2], "'splits' must be a list of split names"),
    ({"train": 1}, "'splits' must be a list of split names"),
    ([], "'splits' must be a list of split names"),
    (["../outside"], "'../outside' is not a name inside"),
    (["/etc"], "'/etc' is not a name inside"),
])
def test_dataset_dict_splits_of_the_wrong_type_or_outside_the_folder_are_one_line(tmp_path, splits, message):
    folder = tmp_path / "dict"
    _write(folder / "dataset_dict.json", json.dumps({"splits": splits}))
    with pytest.raises(DataError, match=message) as refused:
        read_records(folder)
    assert "dataset_dict.json" in str(refused.value)


@pytest.mark.parametrize("name", ["../secret.arrow", "/etc/passwd", 5, ""])
def test_state_json_files_outside_the_folder_are_refused(tmp_path, name):
    folder = tmp_path / "saved"
    _write(tmp_path / "secret.arrow", "")
    _write(folder / "state.json", json.dumps({"_data_files": [{"filename": name}]}))
    with pytest.raises(DataError, match="state.json: .* is not a name inside"):
        read_records(folder)


def test_unreadable_file_carries_the_source_and_the_reason(tmp_path):
    err = UnreadableFile(tmp_path / "x.json", "not valid JSON")
    assert str(err) == f"{tmp_path / 'x.json'}: not valid JSON" and err.reason == "not valid JSON"
