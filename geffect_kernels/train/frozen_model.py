"""The reference a run compares with is its *starting* model; a second copy of the model is kept only when nothing
else can stand in for it.

- Reference log-probabilities (NPO, TNPO, WTNPO): `StartingLogprobs` computes those of the whole forget set with
  the model itself before its first update, and keeps them (on the CPU: B·T numbers beside a model's billions).
- A KL retain term with LoRA: the model with its adapters disabled is the starting model (`AdaptersDisabled`,
  peft's ``disable_adapter``); no copy.
- A KL retain term in full fine-tuning: a frozen copy (`FrozenCopy`), in the dtype the model was loaded in, on the
  model's device or on the CPU (``reference_device="cpu"``).
"""
from __future__ import annotations

import copy
import itertools

import torch

from .. import hf
from ..layers import layer_hidden
from ..model_mode import eval_mode
from ..objective_inputs import head_inputs


def frozen_copy(model, device=None):
    """A frozen, eval-mode copy of ``model`` on ``device`` (default: where each tensor is), its tensors copied one
    at a time straight to ``device`` (never a whole second model on the first one)."""
    memo = {}
    if device is not None:
        device = torch.device(device)
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            moved = tensor.detach().to(device, copy=True)
            memo[id(tensor)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(
                tensor, torch.nn.Parameter) else moved
    reference = copy.deepcopy(model, memo).eval()
    reference.requires_grad_(False)
    return reference


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model whose adapters can be switched off (LoRA and the like)."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class AdaptersDisabled:
    """The starting model of a LoRA run: the trained model itself with its adapters switched off."""

    def __init__(self, model):
        self.model = model

    def reference_inputs(self, batch):
        with torch.no_grad(), self.model.disable_adapter():
            return head_inputs(self.model, batch)

    def layer_hidden(self, batch, layer):
        with torch.no_grad(), self.model.disable_adapter():
            return layer_hidden(self.model, batch, layer)


class FrozenCopy:
    """A frozen copy of the starting model, on its own device; its head inputs come back on the batch's."""

    def __init__(self, model, device=None):
        self.model = frozen_copy(model, device)
        self.device = next(self.model.parameters()).device

    def reference_inputs(self, batch):
        device = batch["input_ids"].device
        with torch.no_grad():
            x = head_inputs(self.model, {k: v.to(self.device) for k, v in batch.items()})
        if self.device == device:
            return x
        return x._replace(hidden=x.hidden.to(device), weight=x.weight.to(device), labels=x.labels.to(device),
                          bias=None if x.bias is None else x.bias.to(device))

    def layer_hidden(self, batch, layer):
        device = batch["input_ids"].device
        with torch.no_grad():
            return layer_hidden(self.model, {k: v.to(self.device) for k, v in batch.items()}, layer).to(device)


def kl_reference(model, reference_device=None):
    """The starting model a KL or RR retain term (or an objective that reads it) compares with, for a run starting
    from ``model``."""
    if is_lora(model):
        return AdaptersDisabled(model)
    return FrozenCopy(model, reference_device)


class StartingLogprobs:
    """ℓ_ref,t of every sample of ``data`` (an EncodedSet) by ``model`` as it is now (the starting model), in
    batches of ``batch_size``, without dropout; kept on the CPU."""

    def __init__(self, model, data, *, batch_size, backend="auto"):
        self.rows: list[torch.Tensor] = []
        device = next(model.parameters()).device
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(data), batch_size):
                indices = range(start, min(start + batch_size, len(data)))
                batch = {k: v.to(device) for k, v in data.batch(indices).items()}
                logprobs = hf.token_logprobs(model, batch, backend=backend).float().cpu()
                self.rows += [logprobs[row, : len(data.examples[i]["input_ids"]) - 1].clone()
                              for row, i in enumerate(indices)]

    def batch(self, indices, width: int, device) -> torch.Tensor:
        """``[B, width - 1]`` reference log-probabilities (HF shift), zero past each sample's end."""
        out = torch.zeros(len(indices), width - 1)
        for row, i in enumerate(indices):
            out[row, : len(self.rows[i])] = self.rows[i]
        return out.to(device)
