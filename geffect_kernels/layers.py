"""A decoder's blocks by index: the chosen layer of RMU and RR, its activations, and the parameters RMU trains.

Layer ℓ's activations are the output of block ℓ (0-based), what the RMU paper's code hooks
(``model.model.layers[layer_id]``): ``output_hidden_states[ℓ + 1]`` of a Hugging Face model, but for the last block,
whose entry there is after the final norm. The forward stops after that block: nothing above it reaches the loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import hf

WMDP_LAYER, WMDP_DEPTH = 7, 32  # the RMU paper's code steers layer 7 of Zephyr-7B's 32
WMDP_LAYERS_BELOW = 2  # and trains layers 5, 6, 7 (`--layer_ids 5,6,7`)
# the MLP's output projection (WMDP's `--param_ids 6` in a Llama/Mistral block: mlp.down_proj), by family
_MLP_OUTPUTS = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")
_MLPS = ("mlp", "feed_forward", "ffn")
_BLOCK_LISTS = ("layers", "h", "blocks", "block", "layer")


def decoder_layers(model) -> nn.ModuleList:
    """The ModuleList of ``model``'s decoder blocks (``model.layers``, GPT-2's ``transformer.h``, ...)."""
    lm = hf.causal_lm(model)
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS and len(module):
            return module
    raise ValueError(f"{type(lm).__name__} has no list of decoder blocks (model.layers, transformer.h, ...): it has no "
                     f"layer to read activations from")


def default_layer(depth: int) -> int:
    """The RMU paper's layer scaled with depth: round(7/32 · depth), i.e. 7 of 32, 1 of 4, 0 of 2."""
    return min(depth - 1, round(WMDP_LAYER * depth / WMDP_DEPTH))


def layer_index(model, value) -> int:
    """Hyper-parameter ``layer`` as a block index of ``model``: −1 is `default_layer`; ValueError when it is not an
    integer or not a block of the model."""
    depth = len(decoder_layers(model))
    if float(value) != int(value):
        raise ValueError(f"layer must be an integer block index (or -1: scaled with depth), got {value!r}")
    index = int(value)
    if index == -1:
        return default_layer(depth)
    if not 0 <= index < depth:
        raise ValueError(f"layer {index} is outside the model's {depth} decoder layers (0..{depth - 1})")
    return index


class _Reached(Exception):
    """Raised by the hook once the chosen block has run: the layers above it are not needed."""


def layer_hidden(model, batch, layer: int) -> torch.Tensor:
    """Block ``layer``'s output ``[B, T, H]`` on ``batch`` (differentiable when grad is enabled)."""
    seen = []

    def hook(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        hf.final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"))
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"decoder layer {layer} did not run in the model's forward")
    return seen[0]


def rmu_trained_parameters(model, layer_value) -> set[str]:
    """Names of the parameters RMU trains (WMDP's ``--layer_ids 5,6,7 --param_ids 6``): the trainable parameters of
    the MLP output projection of the steered block and the two below it (LoRA: its adapters there)."""
    layer = layer_index(model, layer_value)
    blocks = decoder_layers(model)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = set()
    for index in range(max(0, layer - WMDP_LAYERS_BELOW), layer + 1):
        projection = _mlp_output(blocks[index])
        if projection is None:
            raise ValueError(f"decoder layer {index} ({type(blocks[index]).__name__}) has no MLP output projection "
                             f"({', '.join(_MLP_OUTPUTS)}) for RMU to train")
        chosen |= {names[id(p)] for p in projection.parameters() if p.requires_grad}
    if not chosen:
        low = max(0, layer - WMDP_LAYERS_BELOW)
        raise ValueError(f"RMU trains the MLP output projections of layers {low}..{layer}, but none of their "
                         f"parameters is trainable (LoRA: add down_proj to the targets)")
    return chosen


def _mlp_output(block):
    for mlp_name in _MLPS:
        mlp = getattr(block, mlp_name, None)
        if mlp is None:
            continue
        for name in _MLP_OUTPUTS:
            module = getattr(mlp, name, None)
            if module is not None:
                return module
    return None
