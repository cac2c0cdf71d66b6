"""What an unlearning Trainer compares with: the starting model.

- Its log-probabilities of every forget example (NPO, TNPO, WTNPO, ...): computed once, before the first update,
  and kept on the CPU (B·T numbers), or given by the user. With LoRA they are the model's with its adapters disabled,
  which is the starting model whenever they are computed.
- Its log-probabilities of the substitute answers (DPO), likewise.
- The starting model itself, for what needs more than log-probabilities (a KL or RR retain term, a reference
  distribution): with LoRA the model with its adapters disabled, otherwise a frozen copy
  (`train.frozen_model.kl_reference`), made only when an entry declares it reads it.
"""
from __future__ import annotations

import contextlib

import torch

from .. import hf
from ..data.prompts import collate
from ..model_mode import eval_mode
from ..objective_inputs import ReferenceState
from ..train.frozen_model import is_lora, kl_reference


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
            batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in part], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
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


def _padded(rows, index, width, device) -> torch.Tensor:
    """``[len(index), width - 1]`` of ``rows[i]`` for i in ``index``, 0 past each row's end."""
    out = torch.zeros(len(index), width - 1)
    for row, i in enumerate(index):
        out[row, : len(rows[i])] = rows[i]
    return out.to(device)


class StartingModel:
    """The reference of a run: the starting model's log-probabilities of the forget answers (``rows``) and of their
    substitute answers (``alternate_rows``), by forget index, and with ``whole_model`` the starting model itself
    (`train.frozen_model.kl_reference`: made now, before the first update); `state` hands them to a batch's loss."""

    def __init__(self, model, rows=None, alternate_rows=None, *, whole_model: bool = False, seed: int = 0):
        self.rows, self.alternate_rows, self.seed = rows, alternate_rows, int(seed)
        self.model = kl_reference(model) if whole_model else None

    def logprobs(self, batch) -> torch.Tensor | None:
        """``[B, T - 1]`` reference log-probabilities of forget ``batch``'s answers (its ``index``) on its device, 0
        past each example's end; None when there are none."""
        if self.rows is None:
            return None
        return _padded(self.rows, batch["index"].tolist(), batch["input_ids"].shape[1], batch["input_ids"].device)

    def state(self, batch) -> ReferenceState:
        """What ``batch``'s loss compares with (`objective_inputs.ReferenceState`); a retain batch (no ``index``)
        gets the starting model and the seed."""
        if "index" not in batch:
            return ReferenceState(model=self.model, seed=self.seed)
        alternate = None
        if self.alternate_rows is not None:
            alternate = _padded(self.alternate_rows, batch["index"].tolist(), batch["alternate_input_ids"].shape[1],
                                batch["input_ids"].device)
        return ReferenceState(self.logprobs(batch), alternate, self.model, self.seed)
