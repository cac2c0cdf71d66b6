"""A Hugging Face model loaded straight into FSDP2 shards on two gloo ranks (`hf_shards`): the logits and LoRA
adapters of one process, each rank reading only its own slice of every weight and never the whole model, and
the model saved a block at a time loads back with ``from_pretrained`` unchanged."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from geffect_kernels.train.hf_shards import INDEX, weight_files
from geffect_kernels.train.lora import add_lora

from hf_shards_cases import IDS, LORA, save_model
from ranks import TESTS, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_shards")
    model = save_model(root / "model")
    run_ranks([TESTS / "distributed" / "hf_shards.py", root / "model", root / "out"], world=2, timeout=600)
    ranks = [torch.load(root / "out" / f"rank{r}.pt") for r in range(2)]
    return root, model, ranks


def test_each_rank_reads_only_its_slices_and_computes_the_logits_of_one_process(sharded):
    root, model, ranks = sharded
    assert len(json.loads((root / "model" / INDEX).read_text())["weight_map"]) == len(model.state_dict())
    total = sum(p.numel() for p in model.parameters())
    for case in ("full", "lora"):
        for rank, got in enumerate(ranks):
            mine = got[case]
            base = sum(n for name, n in mine["local"].items() if "lora_" not in name)
            assert mine["read"] == base, (rank, case)  # its shards of the base weights, nothing more
            assert base < 0.6 * total, (rank, case)
            with torch.no_grad():
                expected = model(input_ids=IDS).logits
            assert torch.allclose(mine["logits"], expected, rtol=0, atol=1e-6), (rank, case)  # rotary buffers too
        assert sum(r[case]["read"] for r in ranks) == total, case


def test_lora_adapters_are_those_of_one_process_and_only_they_train(sharded):
    root, model, ranks = sharded
    one = add_lora(AutoModelForCausalLM.from_pretrained(root / "model"), **LORA)
    expected = {name: p for name, p in one.named_parameters() if "lora_" in name}
    assert len(expected) == 8
    for rank, got in enumerate(ranks):
        assert set(got["lora"]["adapters"]) == set(expected), rank
        for name, value in expected.items():
            assert torch.equal(got["lora"]["adapters"][name], value.detach()), (rank, name)
        assert got["lora"]["trainable"] == sorted(expected), rank
        assert all("lora_" not in name for name in got["full"]["adapters"])


def test_saved_a_block_at_a_time_it_loads_back_unchanged(sharded):
    root, model, _ = sharded
    back = AutoModelForCausalLM.from_pretrained(root / "out" / "full")
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    files = sorted(p.name for p in (root / "out" / "full").glob("model-*.safetensors"))
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]  # block 0, block 1, the root
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "model"), root / "out" / "lora")
    assert not list((root / "out" / "lora").glob("model*.safetensors"))  # the adapter alone
    one = add_lora(AutoModelForCausalLM.from_pretrained(root / "model"), **LORA)
    for (name, got), (_, want) in zip(adapter.named_parameters(), one.named_parameters()):
        assert torch.equal(got, want), name


def test_a_folder_without_safetensors_weights_is_a_one_line_error(tmp_path):
    save_model(tmp_path)
    for path in tmp_path.glob("model*.safetensors*"):
        path.unlink()
    with pytest.raises(ValueError, match="holds no safetensors weights") as err:
        weight_files(tmp_path)
    assert "\n" not in str(err.value)
