"""What an unlearning Trainer compares with: the starting model.

- Its log-probabilities of every forget example (NPO, TNPO, WTNPO, ...): computed once, before the first update,
  and kept on the CPU (B·T numbers), or given by the user. With LoRA they are the model's with its adapters disabled,
  which is the starting model whenever they are computed.
- The starting model itself, for what needs more than log-probabilities (a KL retain term, a reference
  distribution): with LoRA the model with its adapters disabled, otherwise a frozen copy
  (`train.frozen_model.kl_reference`), made only when an objective asks for it.
"""
from __future__ import annotations

import contextlib

import torch

from .. import hf
from ..model_mode import eval_mode
from ..train.frozen_model import is_lora, kl_reference
from .collator import PairCollator


def starting_logprobs(model, examples: list[dict], *, pad_id: int, batch_size: int, backend="auto"
                      ) -> list[torch.Tensor]:
    """ℓ_ref,t of each example (float32 on the CPU, length ``len(input_ids) - 1``: HF shift) by ``model`` as it is
    now, in eval mode; a LoRA model with its adapters disabled."""
    rows = []
    device = next(model.parameters()).device
    adapters_off = model.disable_adapter() if is_lora(model) else contextlib.nullcontext()
    with eval_mode(model), torch.no_grad(), adapters_off:
        for start in range(0, len(examples), batch_size):
            part = examples[start:start + batch_size]
            batch = PairCollator(pad_id)([{"forget": {**e, "index": 0}} for e in part])["forget"]
            batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
            logprobs = hf.token_logprobs(model, batch, backend=backend).float().cpu()
            rows += [logprobs[row, : len(e["input_ids"]) - 1].clone() for row, e in enumerate(part)]
    return rows


def checked_logprobs(values, examples: list[dict]) -> list[torch.Tensor]:
    """User-given reference log-probabilities: one 1-D sequence per forget example, ``len(input_ids) - 1`` long
    (HF shift) or ``len(input_ids)`` long (the last dropped); ValueError naming ``ref_logprobs`` otherwise."""
    if len(values) != len(examples):
        raise ValueError(f"ref_logprobs has {len(values)} rows for {len(examples)} forget examples")
    rows = []
    for i, (value, example) in enumerate(zip(values, examples)):
        row = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        width = len(example["input_ids"]) - 1
        if row.dim() != 1 or row.shape[0] not in (width, width + 1):
            raise ValueError(f"ref_logprobs[{i}] has shape {tuple(row.shape)}; forget example {i} needs {width} "
                             f"values (one per token after the first)")
        if not bool(torch.isfinite(row).all()):
            raise ValueError(f"ref_logprobs[{i}] holds NaN or inf")
        rows.append(row[:width].clone())
    return rows


class StartingModel:
    """The reference of a run: ``logprobs(batch)`` of forget batches (their ``index``), and with ``whole_model``
    the starting model for what needs more (`reference_inputs`): made now, before the first update."""

    def __init__(self, model, rows: list[torch.Tensor] | None = None, *, whole_model: bool = False):
        self.rows = rows
        self.model = kl_reference(model) if whole_model else None

    def logprobs(self, batch) -> torch.Tensor | None:
        """``[B, T - 1]`` reference log-probabilities of forget ``batch`` on its device, 0 past each example's end;
        None when there are none."""
        if self.rows is None:
            return None
        index, width = batch["index"].tolist(), batch["input_ids"].shape[1]
        out = torch.zeros(len(index), width - 1)
        for row, i in enumerate(index):
            out[row, : len(self.rows[i])] = self.rows[i]
        return out.to(batch["input_ids"].device)

    def reference_inputs(self, batch):
        """The starting model's head inputs on ``batch`` (`hf.HeadInputs`), without autograd."""
        if self.model is None:
            raise ValueError("this run's reference holds log-probabilities only (no objective asked for the model)")
        return self.model.reference_inputs(batch)
