"""A Hugging Face safetensors model straight into FSDP2 shards, and back, without an unsharded model on any rank.

Loading (`load_sharded`): the model is built on the meta device (no memory), wrapped (LoRA) and sharded
(`sharding.shard`), then each rank allocates only its shards and reads only its own slice of every weight from
the safetensors files (``safe_open(...).get_slice``; the DTensor placements tell the slice). Non-persistent
buffers (rotary ``inv_freq``) are recomputed by transformers' own initialization, as ``from_pretrained`` does.
A rank holds at peak its shards plus one tensor's slice being copied (`peak_bytes`).

Saving (`save_sharded`): a Hugging Face sharded checkpoint, one file per FSDP unit (each decoder block, then
the root: embedding, final norm, head) — ``model-0000i-of-0000n.safetensors``, ``model.safetensors.index.json``
and the config — gathered one unit at a time (every rank takes part, rank 0 writes and frees it), so no rank
holds more than one unit unsharded.

Per rank, with P parameters of b bytes, P_blk in the largest decoder block, P_root in the root's own modules,
P_max in the largest tensor, R ranks (`peak_bytes`):

    load:              b·P/R + b·P_max/R                   the shards and the slice being copied
    save, rank 0:      b·P/R + b·max(P_blk, P_root) + b·P_max   ... one unit held until written, a tensor gathered
    save, other ranks: b·P/R + b·P_max                     (gloo gathers through a second buffer: 2·b·P_max)

against b·P on every rank (load) and b·P on rank 0 (save) when the model is loaded whole and gathered whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .. import hf
from .sharding import decoder_blocks, shard
from ..structured_files import read_json

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def load_sharded(path, device: torch.device, *, wrap=None, trainable: bool = True):
    """The causal LM saved in ``path`` (a Hugging Face folder with safetensors weights), sharded over the default
    process group. ``wrap(model) -> model`` runs on the meta-device model before sharding (e.g. `lora.add_lora`;
    what it creates for real, like adapters, is kept as it is). ``trainable=False`` freezes every parameter
    (a reference model). ValueError (one line) when the folder holds no such model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    files = weight_files(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = wrap(model) if wrap is not None else model
    shard(model, device)
    to_read = _materialize(model, device)
    _read_slices(hf.causal_lm(model), to_read, files, path)
    _recompute_buffers(hf.causal_lm(model))
    if not trainable:
        model.requires_grad_(False)
    return model.eval()  # as from_pretrained returns it


def weight_files(path: Path) -> dict[str, Path]:
    """``{checkpoint key: its safetensors file}`` of the model in ``path``."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ValueError(f"{path / INDEX}: weight_map must map weight names to file names")
        return {key: path / name for key, name in weight_map.items()}
    if (path / WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(path / WEIGHTS, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / WEIGHTS)
    raise ValueError(f"{path} holds no safetensors weights ({WEIGHTS} or {INDEX}): a sharded run reads each rank's "
                     f"slice from safetensors files (re-save the model with save_pretrained)")


def _materialize(model, device) -> set[str]:
    """Allocate (uninitialized) this rank's part of every parameter and buffer still on the meta device; the
    names of the parameters that were there (the ones to read from the checkpoint)."""
    lm = hf.causal_lm(model)
    on_meta = {name for name, p in lm.named_parameters() if p.is_meta}
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            module.to_empty(device=device, recurse=False)
    return on_meta


def checkpoint_key(name: str) -> str:
    """The checkpoint's name for parameter ``name`` of the causal LM (peft's LoRA wraps a layer as ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def _read_slices(lm, names: set[str], files: dict[str, Path], path: Path):
    """Copy into each parameter of ``names`` this rank's slice of its checkpoint tensor, read alone (the file is
    opened per tensor: the memory-mapped pages a slice touched are let go before the next one)."""
    from safetensors import safe_open

    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name not in names:
                continue
            key = checkpoint_key(name)
            if key not in files:
                raise ValueError(f"{path}: the checkpoint has no weight {key!r} for parameter {name}")
            with safe_open(files[key], framework="pt") as f:
                stored = f.get_slice(key)
                if list(stored.get_shape()) != list(param.shape):
                    raise ValueError(f"{path}: weight {key!r} is {stored.get_shape()} but the model's config makes "
                                     f"it {list(param.shape)}")
                local, index = local_part(param)
                if local.numel():  # the last ranks of a short dimension may hold nothing
                    local.copy_(stored[index])


def local_part(param) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``param``'s local tensor on this rank and the slice of the full tensor it holds (the whole tensor when
    ``param`` is not a DTensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, tuple(slice(0, n) for n in param.shape)
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _recompute_buffers(lm):
    """Non-persistent buffers (rotary ``inv_freq``, ...) from transformers' initialization, as ``from_pretrained``
    does after its own meta-device build; every parameter is marked loaded so that it is left alone."""
    params = list(lm.parameters())
    for p in params:
        p._is_hf_initialized = True
    try:
        lm.initialize_weights()
    finally:
        for p in params:
            del p._is_hf_initialized


def save_sharded(model, folder):
    """Write ``model`` (FSDP2-sharded) into ``folder`` as ``save_pretrained`` would: a peft model's adapter alone
    (small: gathered whole), else a Hugging Face sharded checkpoint gathered one FSDP unit at a time. Every rank
    calls it, rank 0 writes; ``from_pretrained`` loads the result."""
    folder = Path(folder)
    if hf.causal_lm(model) is not model:  # peft: the trainable parameters are the adapter
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        adapter = _gathered(model.state_dict(), trainable)
        if dist.get_rank() == 0:
            model.save_pretrained(folder, state_dict=adapter)
        return
    lm = hf.causal_lm(model)
    units = _units(lm)
    weight_map, total = {}, 0
    for i, keys in enumerate(units, 1):
        unit = _gathered(lm.state_dict(), keys)  # the state dict holds shards: only this unit is gathered
        if dist.get_rank() == 0:
            name = f"model-{i:05d}-of-{len(units):05d}.safetensors"
            folder.mkdir(parents=True, exist_ok=True)
            save_file(unit, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(unit, name))
            total += sum(t.numel() * t.element_size() for t in unit.values())
        del unit
    if dist.get_rank() == 0:
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2))
        lm.config.save_pretrained(folder)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(folder)


def _gathered(state: dict, keys) -> dict[str, torch.Tensor]:
    """The full values of ``state[key]`` for ``keys``, on rank 0's CPU (empty elsewhere); every rank takes part
    in each gather, one tensor at a time."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key in keys:
        value = state[key]
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if dist.get_rank() == 0:
            out[key] = full.detach().to("cpu").contiguous()
        del full
    return out


def _units(lm) -> list[list[str]]:
    """The state-dict keys of ``lm`` per FSDP unit: each decoder block's, then the rest (the root's)."""
    prefixes = {id(m): name + "." for name, m in lm.named_modules()}
    blocks = [prefixes[id(block)] for block in decoder_blocks(lm)]
    keys = list(lm.state_dict())
    units = [[k for k in keys if k.startswith(prefix)] for prefix in blocks]
    claimed = {k for unit in units for k in unit}
    return [unit for unit in units if unit] + [[k for k in keys if k not in claimed]]


def peak_bytes(params: int, block: int, root: int, largest: int, world: int, dtype_bytes: int = 4) -> dict:
    """The formula above: the bytes a rank holds at peak loading (``load``) and saving (``save``: rank 0's)."""
    shards = dtype_bytes * params / world
    return {"load": shards + dtype_bytes * largest / world,
            "save": shards + dtype_bytes * max(block, root) + dtype_bytes * largest}
