"""Files from outside (data sets, settings, run folders, model folders, evaluation logs) crafted or broken: each is
refused with one line that names it, and none runs code, crashes the process or reads outside its folder."""
import json
import os

import pytest

from geffect_kernels.data import DataError, read_records
from geffect_kernels.structured_files import UnreadableFile, read_json, read_yaml
from test_cli import run, workspace  # noqa: F401  (workspace is a fixture)

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # the parsers recursed into this until RecursionError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def _deep_readers(tmp_path):
    """(what, the file written deep, a call that reads it) for every place JSON or YAML is read."""
    from geffect_kernels.cli.inputs import check_model_dir
    from geffect_kernels.data.alternates import alternate_answers
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
        ("--alternate", _write(t / "alternates.jsonl", '{"a": ' + DEEP_JSON + "}\n"),
         lambda p: alternate_answers(p, ["Q?"])),
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


# --- Arrow and parquet files whose schema declares a Python extension type (CVE-2023-47248) -----------------------

PY_EXTENSION = b"arrow.py_extension_type"


class _CreatesMarker:
    """A pickle whose loading creates the file ``marker``: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def unpickling_pyarrow():
    """pyarrow as 14.0.0 was: a registered ``arrow.py_extension_type`` that unpickles the field's extension
    metadata while the schema is read. Newer pyarrow has none, so the refusal is tested against the old one."""
    pa = pytest.importorskip("pyarrow")
    import pickle

    class UnpicklingExtension(pa.ExtensionType):
        def __init__(self, storage=pa.string()):
            super().__init__(storage, PY_EXTENSION.decode())

        def __arrow_ext_serialize__(self):
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            pickle.loads(serialized)  # what pyarrow < 14.0.1 did (PyExtensionType)
            return cls(storage_type)

    pa.register_extension_type(UnpicklingExtension())
    try:
        yield pa
    finally:
        pa.unregister_extension_type(PY_EXTENSION.decode())


def _crafted_table(pa, marker, where):
    """TOFU records whose schema declares the Python extension type ``where``: on a column, on a field nested in
    a struct, on a list's items, or in the schema's own metadata."""
    import pickle

    declared = {b"ARROW:extension:name": PY_EXTENSION, b"ARROW:extension:metadata": pickle.dumps(
        _CreatesMarker(marker))}
    question = pa.field("question", pa.string(), metadata=declared if where == "column" else None)
    inner = pa.field("x", pa.string(), metadata=declared if where == "nested" else None)
    item = pa.field("item", pa.string(), metadata=declared if where == "list item" else None)
    schema = pa.schema([question, pa.field("answer", pa.string()), pa.field("extra", pa.struct([inner])),
                        pa.field("tags", pa.list_(item))], metadata=declared if where == "schema" else None)
    columns = [pa.array(["Q1?", "Q2?"]), pa.array(["A1.", "A2."]), pa.array([{"x": "a"}, {"x": "b"}]),
               pa.array([["t"], []])]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(columns, schema)], schema=schema)


def _write_ipc(pa, table, path, file_format=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink:
        with (pa.ipc.new_file if file_format else pa.ipc.new_stream)(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def _six_layouts(pa, table, root):
    """(layout, what read_records is given) with ``table`` written in each layout --forget takes."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "forget.parquet")
    _write_ipc(pa, table, root / "stream.arrow")
    _write_ipc(pa, table, root / "file.arrow", file_format=True)
    _write_ipc(pa, table, root / "saved" / "data-00000-of-00001.arrow")
    (root / "saved" / "state.json").write_text(json.dumps({"_data_files": [{"filename":
                                                                              "data-00000-of-00001.arrow"}]}))
    (root / "hub" / "data").mkdir(parents=True)
    pq.write_table(table, root / "hub" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table, root / "hub" / "data" / "test-00000-of-00001.parquet")
    return [("parquet", root / "forget.parquet"), ("Arrow stream", root / "stream.arrow"),
            ("Arrow file", root / "file.arrow"), ("save_to_disk folder", root / "saved"),
            ("Hub folder", root / "hub"), ("FOLDER/train", root / "hub" / "train")]


@pytest.mark.parametrize("where", ["column", "nested", "list item", "schema"])
def test_a_python_extension_type_is_refused_in_every_layout_before_anything_unpickles_it(
        tmp_path, unpickling_pyarrow, where):
    pa = unpickling_pyarrow
    marker = tmp_path / "marker"
    layouts = _six_layouts(pa, _crafted_table(pa, marker, where), tmp_path / "data")
    for layout, path in layouts:
        with pytest.raises(DataError, match="declares a Python extension type") as refused:
            read_records(path)
        assert "\n" not in str(refused.value) and str(tmp_path) in str(refused.value), layout
        assert not marker.exists(), f"{layout}: the payload ran"
    legacy = pa.ipc.IpcWriteOptions(use_legacy_format=True)
    table = _crafted_table(pa, marker, where)
    with pa.OSFile(str(tmp_path / "legacy.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema, options=legacy) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match="declares a Python extension type"):
        read_records(tmp_path / "legacy.arrow")
    assert not marker.exists()
    if where == "column":  # the test's pyarrow does unpickle: reading the file itself runs the payload
        pa.ipc.open_stream(str(tmp_path / "data" / "stream.arrow")).read_all()
        assert marker.exists()


def test_a_python_extension_type_is_one_line_from_geffect_train(capsys, workspace, tmp_path, unpickling_pyarrow):
    import pyarrow.parquet as pq

    marker = tmp_path / "marker"
    pq.write_table(_crafted_table(unpickling_pyarrow, marker, "column"), tmp_path / "forget.parquet")
    code, _, err = run(capsys, "train", "--model", workspace / "model", "--forget", tmp_path / "forget.parquet",
                       "--retain", workspace / "retain.json", "--out", tmp_path / "out", "--steps", 1,
                       "--no-progress")
    assert code == 1 and err.count("\n") == 1 and "declares a Python extension type" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_ordinary_arrow_and_parquet_files_still_read(tmp_path):
    """The schema reader passes what pyarrow writes: nested types, dictionaries, several row groups, statistics,
    a parquet file without its Arrow schema, an IPC file."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": f"Q{i}?", "answer": f"A{i}.", "n": i, "extra": {"x": [i, i + 1]}} for i in range(7)]
    table = pa.Table.from_pylist(rows).append_column("kind", pa.array(["a", "b"] * 3 + ["a"]).dictionary_encode())
    expected = [{**r, "kind": "ab"[i % 2]} for i, r in enumerate(rows)]
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=2)
    pq.write_table(table, tmp_path / "bare.parquet", store_schema=False)
    pq.write_table(table, tmp_path / "options.parquet", write_page_index=True, use_dictionary=False,
                   compression="zstd", data_page_version="2.0", write_statistics=False)
    _write_ipc(pa, table, tmp_path / "file.arrow", file_format=True)
    legacy = pa.ipc.IpcWriteOptions(use_legacy_format=True)  # no continuation marker before each message
    with pa.OSFile(str(tmp_path / "legacy.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema, options=legacy) as writer:
        writer.write_table(table)
    for name in ("groups.parquet", "bare.parquet", "options.parquet", "file.arrow", "legacy.arrow"):
        assert read_records(tmp_path / name) == expected, name


@pytest.mark.parametrize("offsets", [(0, 100_000_000, 4, 6), (0, 2, 4, 100_000_000)])
def test_string_offsets_past_their_data_are_one_line_not_a_crash(tmp_path, offsets):
    pa = pytest.importorskip("pyarrow")
    import struct

    table = pa.table({"question": ["ab", "cd", "ef"], "answer": ["x", "y", "z"]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    good, bad = struct.pack("<4i", 0, 2, 4, 6), struct.pack("<4i", *offsets)
    data = sink.getvalue().to_pybytes()
    assert data.count(good) == 1
    (tmp_path / "forget.arrow").write_bytes(data.replace(good, bad))
    with pytest.raises(DataError, match="forget.arrow: damaged Arrow data .*offset"):
        read_records(tmp_path / "forget.arrow")


@pytest.mark.parametrize("damage", ["truncated", "no footer magic", "footer length", "flipped"])
def test_damaged_schemas_are_one_line(tmp_path, damage):
    """Whatever the schema reader meets, it answers with DataError: bytes cut, lengths past the end, bits flipped."""
    pa = pytest.importorskip("pyarrow")
    import random

    import pyarrow.parquet as pq

    table = pa.table({"question": ["ab", "cd"], "answer": ["x", "y"]})
    pq.write_table(table, tmp_path / "x.parquet")
    _write_ipc(pa, table, tmp_path / "x.arrow", file_format=True)
    rng = random.Random(0)
    for name in ("x.parquet", "x.arrow"):
        data = bytearray((tmp_path / name).read_bytes())
        if damage == "truncated":
            data = data[:len(data) // 2]
        elif damage == "no footer magic":
            data[-1] ^= 0xFF
        elif damage == "footer length":
            data[-10 if name.endswith("arrow") else -8] = 0x7F
        out = tmp_path / f"damaged-{name}"
        for trial in range(60 if damage == "flipped" else 1):
            copy = bytearray(data)
            if damage == "flipped":
                for _ in range(3):
                    copy[rng.randrange(len(copy))] ^= 1 << rng.randrange(8)
            out.write_bytes(bytes(copy))
            try:
                read_records(out)
            except DataError as err:
                assert "\n" not in str(err) and str(out) in str(err)


# --- out of the host's memory -------------------------------------------------------------------------------------

def _host_out_of_memory() -> RuntimeError:
    """The RuntimeError torch raises when the host cannot give an allocation (an adapter of r = 1e9 asked for
    128 GB): this machine's own, else the text Linux builds of torch give."""
    import torch

    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as err:
        return err
    return RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [
    _host_out_of_memory,
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_the_host_out_of_memory_is_one_line_that_says_what_to_lower(capsys, workspace, tmp_path, monkeypatch,
                                                                     error):
    from geffect_kernels.train import loop
    from test_cli_misuse import one_line_error, train_argv

    raised = error()

    def no_memory(run, evaluate=None):
        raise raised

    monkeypatch.setattr(loop, "run_steps", no_memory)
    err = one_line_error(capsys, *train_argv(workspace, tmp_path / "out"))
    assert err.startswith("geffect: error: out of memory (") and "lower --batch-size or --max-length" in err, err
    assert "--lora-r" in err and "enforce fail" not in err, err


# --- --retain-eval: content checked, items matched -----------------------------------------------------------------

def _tofu_log(indices, paraphrased=None):
    """TOFU's eval_log_forget.json over ``indices``: random losses (a fixed seed), or ``paraphrased`` ones."""
    import random

    rng = random.Random(len(indices))
    para = paraphrased or [rng.uniform(0.5, 3.0) for _ in indices]
    return {"avg_paraphrased_loss": {str(i): p for i, p in zip(indices, para)},
            "average_perturb_loss": {str(i): [rng.uniform(0.5, 3.0) for _ in range(3)] for i in indices}}


@pytest.mark.parametrize("content, message", [
    ({"avg_paraphrased_loss": [1.0, 2.0], "average_perturb_loss": [[1.0], [2.0]]},
     "avg_paraphrased_loss must map each forget index"),
    ({"avg_paraphrased_loss": {"0": [1.0]}, "average_perturb_loss": {"0": [1.0]}}, "to a loss"),
    ({"avg_paraphrased_loss": {"a": 1.0}, "average_perturb_loss": {"a": [1.0]}}, "must map each forget index"),
    ({"forget": {"truth_ratio": 5}}, "forget.truth_ratio must be a list of numbers, got '5'"),
    ({"forget": {"truth_ratio": [1.0, "x"]}}, "forget.truth_ratio must be a list of numbers"),
    ({"forget": {"truth_ratio": [1.0], "mia_loss": 3}, "holdout": {"mia_loss": [1.0]}},
     "forget.mia_loss must be a list of numbers"),
    ({"forget": {"truth_ratio": [1.0], "mia_loss": [1.0]}, "holdout": [1.0]}, "holdout must map metrics"),
    ({"forget": {"truth_ratio": [1.0]}, "muse_privleak": [1]}, "muse_privleak is not the scores"),
])
def test_retain_eval_content_of_the_wrong_type_is_one_line_naming_the_file(tmp_path, content, message):
    from geffect_kernels.eval.retain_reference import read_retain_reference

    path = _write(tmp_path / "retain_eval.json", json.dumps(content))
    with pytest.raises(ValueError, match=message) as refused:
        read_retain_reference(path)
    assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value)


def test_retain_eval_nan_losses_or_an_empty_log_give_a_missing_reason_not_nan(tmp_path):
    from geffect_kernels.eval.retain_reference import read_retain_reference
    from geffect_kernels.eval.tofu import summarize

    forget = {"probability": [0.3, 0.5, 0.2], "truth_ratio": [0.9, 1.1, 0.7]}
    nan_log = _tofu_log(range(3), paraphrased=[1.0, float("nan"), 2.0])
    cases = {"nan": (json.dumps(nan_log), "NaN or infinite on 1 forget item(s) (the first: 1)"),
             "empty": (json.dumps({"avg_paraphrased_loss": {}, "average_perturb_loss": {}}), "holds no forget"),
             "nan per-sample": (json.dumps({"forget": {"truth_ratio": [1.0, float("inf"), float("nan")]}}),
                                "NaN or infinite on 2 forget item(s)")}
    for name, (text, reason) in cases.items():
        path = _write(tmp_path / f"{name}.json", text)
        reference = read_retain_reference(path).for_forget_set(3)
        summary = summarize(forget, **reference.as_kwargs())
        assert "forget_quality" not in summary, name
        assert reason in summary["missing"]["forget_quality"] and str(path) in summary["missing"]["forget_quality"]


@pytest.mark.parametrize("indices, size", [(range(3), None), (range(400), None), (range(11, 22), None),
                                           (range(400), 11), ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12], None)])
def test_a_retain_eval_of_other_items_says_the_items_do_not_match(tmp_path, indices, size):
    from geffect_kernels.eval.plan import EvalPlan

    path = _write(tmp_path / "eval_log_forget.json", json.dumps(_tofu_log(list(indices))))
    with pytest.raises(ValueError, match="the items do not match") as refused:
        EvalPlan.from_files([object()] * 11, retain_eval=path, size=size)
    assert str(path) in str(refused.value)


def test_a_retain_eval_of_the_same_items_is_used(tmp_path):
    from geffect_kernels.eval.plan import EvalPlan
    from geffect_kernels.eval.retain_reference import read_retain_reference

    path = _write(tmp_path / "eval_log_forget.json", json.dumps(_tofu_log(list(range(11)))))
    full = read_retain_reference(path).forget_truth_ratios
    assert EvalPlan.from_files([object()] * 11, retain_eval=path).reference.forget_truth_ratios == full
    assert EvalPlan.from_files([object()] * 11, retain_eval=path, size=4).reference.forget_truth_ratios == full[:4]
    first4 = _write(tmp_path / "first4.json", json.dumps({"forget": {"truth_ratio": full[:4]}}))  # --eval-size 4
    assert EvalPlan.from_files([object()] * 11, retain_eval=first4, size=4).reference.forget_truth_ratios == full[:4]


def test_a_retain_model_with_a_smaller_vocabulary_is_one_line(capsys, workspace, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    config = LlamaConfig(vocab_size=len(tokenizer) - 40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run(capsys, "train", "--model", workspace / "model", "--forget", workspace / "forget.json",
                       "--retain", workspace / "retain.json", "--out", tmp_path / "out", "--steps", 1,
                       "--batch-size", 2, "--no-progress", "--eval", "--retain-model", tmp_path / "small")
    assert code == 1 and err.count("\n") == 1, err
    assert f"--retain-model {tmp_path / 'small'}: its vocabulary has {len(tokenizer) - 40} tokens" in err, err
    assert not (tmp_path / "out" / "results").exists()


# --- NaN G-effects (a diverged run) -------------------------------------------------------------------------------

def test_nan_numbers_give_observations_that_cannot_be_decided_not_does_not_hold():
    from geffect_kernels.eval import observations as obs

    nan = float("nan")

    def probes(retain):
        return [{"objective": name, "step": step, "probe_forget_probability": forget,
                 "probe_retain_probability": 0.9 if step == 0 else retain.get(name, 0.6)}
                for name in (*obs.TOKEN_WEIGHTED, *obs.BASELINES, "ga+rectify")
                for step, forget in ((0, 0.9), (2, 0.1))]

    checks = {
        "a": obs.ga_retaining_negative([-0.2, nan, -0.1]),
        "b": obs.shallow_layers_dominate({"ga": [[-3, 2], [1, nan], [0.1, 0.2], [0.3, -0.1]]}, "forget"),
        "c": obs.shallow_layers_dominate({"ga": [[1], [2], [float("inf")]]}, "retain"),
        "d": obs.npo_weights_shrink([0, 2, 4], [1.0, nan, 0.3]),
        "e": obs.npo_spares_damaging_instances([([0.9, 0.2, 0.6], [0.1, nan, 0.4])]),
        "f": obs.token_weighted_damage_less(probes({"wga": nan})),
        "g": obs.guidance_damage_less(probes({"ga+rectify": nan}), "ga+rectify"),
    }
    for letter, check in checks.items():
        assert check.holds is None and check.nan and "NaN or infinite" in check.evidence, (letter, check)
        assert obs.verdict([check]) == "cannot be decided: NaN or infinite numbers", letter
        assert obs.verdict([obs.ga_retaining_negative([-1.0]), check]).startswith("cannot be decided"), letter
