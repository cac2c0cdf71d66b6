"""Which group each parameter's G-effect is reported under.

``"parameter"``: the parameter's own name. ``"layer"``: ``embedding``, ``layer.<i>`` for each transformer
block, ``final_norm``, ``head``. ``"component"``: within a block, the module inside it
(``layer.0.self_attn.q_proj``, ``layer.0.mlp.down_proj``, ``layer.0.input_layernorm``; bias and weight of a
module share its group); outside blocks as ``"layer"``. A callable maps a parameter name to a group name.
Tied input/output embeddings are one parameter, reported under the name ``named_parameters`` gives it
(the input embedding), hence in ``embedding``.
"""
from __future__ import annotations

import re

import torch.nn as nn

MODES = ("parameter", "layer", "component")

# "model.layers.3.mlp.up_proj.weight", "transformer.h.3.attn.c_attn.bias", "blocks.3. ..."
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.(.+)$")


def _outside_block_group(name: str, module: nn.Module, head_names: set[str]) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if name in head_names:
        return "head"
    if "norm" in name.rsplit(".", 1)[0].lower() or "ln_f" in name:
        return "final_norm"
    return name.rsplit(".", 1)[0]  # an unfamiliar module: its own path


def layer_of(name: str) -> str:
    """The ``"layer"`` group of a parameter from its name alone: ``layer.<i>`` inside block i, else the path of
    the module that owns it (``model.embed_tokens``, ``lm_head``), or the name itself for a top-level one."""
    block = _BLOCK.search(name)
    if block:
        return f"layer.{block.group(1)}"
    return name.rsplit(".", 1)[0] if "." in name else name


def parameter_groups(model: nn.Module, groups="layer") -> dict[str, str]:
    """``{parameter name: group}`` for every parameter of ``model``, in the model's parameter order."""
    if callable(groups):
        return {name: str(groups(name)) for name, _ in model.named_parameters()}
    if groups not in MODES:
        raise ValueError(f"groups must be one of {', '.join(map(repr, MODES))} or a callable, got {groups!r}")
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    head_names = {name for name, p in model.named_parameters() if id(p) in head_params}
    result = {}
    for name, _ in model.named_parameters():
        if groups == "parameter":
            result[name] = name
            continue
        block = _BLOCK.search(name)
        if block:
            inside = block.group(2).rsplit(".", 1)[0] if "." in block.group(2) else block.group(2)
            result[name] = f"layer.{block.group(1)}" + (f".{inside}" if groups == "component" else "")
        else:
            result[name] = _outside_block_group(name, modules.get(name.rsplit(".", 1)[0], model), head_names)
    return result
