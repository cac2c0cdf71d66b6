"""A sharded checkpoint's files crafted to run code, to escape the step folder, or torn: each refused with one line
naming the file, and nothing executed (the marker a crafted pickle would create never appears)."""
import json
import pickle
import warnings

import pytest
import torch

from geffect_kernels.train.checkpoint import CheckpointError
from geffect_kernels.train.sharded_checkpoint import (load_shards, read_latest, read_loop_state, read_rng,
                                                      write_loop_state, write_rng)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # torch.distributed.checkpoint without a group


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: what a crafted file could do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _state():
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 5)).square().sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _saved(step_dir, state=None):
    import torch.distributed.checkpoint as dcp

    state = state or _state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(step_dir))
    return state


def _fresh_like(state):
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
            "optimizer": {"state": {k: {n: torch.zeros_like(t) for n, t in s.items()}
                                    for k, s in state["optimizer"]["state"].items()},
                          "param_groups": state["optimizer"]["param_groups"]}}


def test_shards_load_back_exactly(tmp_path):
    saved = _saved(tmp_path / "step-1")
    loaded = _fresh_like(saved)
    load_shards(loaded, tmp_path / "step-1")
    assert all(torch.equal(loaded["model"][k], v) for k, v in saved["model"].items())
    for key, values in saved["optimizer"]["state"].items():
        assert all(torch.equal(loaded["optimizer"]["state"][key][n], t) for n, t in values.items())


def test_a_crafted_index_is_refused_not_executed(tmp_path):
    step = tmp_path / "step-1"
    saved = _saved(step)
    marker = tmp_path / "code_ran"
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"step-1 holds objects other than tensors and plain data \(io.open "
                                              r"is not part of a checkpoint index\): not loaded"):
        load_shards(_fresh_like(saved), step)
    assert not marker.exists()


def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    step = tmp_path / "step-1"
    saved = _saved(step)
    metadata = pickle.loads((step / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"names a shard outside its folder \('../../outside.distcp'\)"):
        load_shards(_fresh_like(saved), step)


def test_a_crafted_entry_in_the_shards_is_refused_not_executed(tmp_path):
    marker = tmp_path / "code_ran"
    saved = _saved(tmp_path / "step-1", {**_state(), "extra": _RunsCode(marker)})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"holds objects other than tensors and plain data \(entry extra"):
        load_shards({**_fresh_like(saved), "extra": None}, tmp_path / "step-1")
    assert not marker.exists()


def test_torn_shards_are_named(tmp_path):
    step = tmp_path / "step-1"
    saved = _saved(step)
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"step-1 cannot be read \("):
        load_shards(_fresh_like(saved), step)
    (step / ".metadata").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"step-1 cannot be read \("):
        load_shards(_fresh_like(saved), step)


def test_rng_and_loop_state_are_plain_data(tmp_path):
    marker = tmp_path / "code_ran"
    write_rng(tmp_path, 0, "cpu")
    assert torch.equal(read_rng(tmp_path, 0)["rng"], torch.get_rng_state())
    torch.save({"rng": _RunsCode(marker)}, tmp_path / "rng-1.pt")
    with pytest.raises(CheckpointError, match=r"rng-1.pt holds objects other than tensors and plain data"):
        read_rng(tmp_path, 1)
    (tmp_path / "rng-2.pt").write_bytes((tmp_path / "rng-0.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"rng-2.pt cannot be read"):
        read_rng(tmp_path, 2)
    assert not marker.exists()
    state = {"step": 3, "settings": {"lr": 1e-3}, "setting_changes": [], "geffects": None}
    write_loop_state(tmp_path, state)
    assert read_loop_state(tmp_path) == state
    (tmp_path / "loop.json").write_text('{"step": 3')
    with pytest.raises(CheckpointError, match=r"loop.json cannot be read"):
        read_loop_state(tmp_path)


@pytest.mark.parametrize("latest", [{"step": "12/../../../outside", "world_size": 2}, {"step": 12},
                                    {"step": True, "world_size": 2}, {"step": 0, "world_size": 2}, [12, 2]])
def test_latest_json_names_an_integer_step_and_world_size(tmp_path, latest):
    assert read_latest(tmp_path) is None
    (tmp_path / "latest.json").write_text(json.dumps(latest))
    with pytest.raises(CheckpointError, match=r"latest.json must name a step and a world size, both positive "
                                              r"integers; delete the run's checkpoint/ folder or pass --overwrite"):
        read_latest(tmp_path)
    (tmp_path / "latest.json").write_text(json.dumps({"step": 12, "world_size": 2}))
    assert read_latest(tmp_path) == {"step": 12, "world_size": 2}
