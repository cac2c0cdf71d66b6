"""Batches of forget-retain pairs: each side right-padded (`data.collate`), the forget side with the indices of
its examples (for their reference log-probabilities) and their substitute answers when they have them."""
from __future__ import annotations

import torch

from ..data.prompts import collate
from ..objective_inputs import ALTERNATE_PREFIX


class PairCollator:
    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items) -> dict:
        forget = [item["forget"] for item in items]
        batch = {"forget": {**collate(forget, self.pad_id),
                            "index": torch.tensor([f["index"] for f in forget], dtype=torch.long)}}
        if all("alternate" in f for f in forget):  # PO, DPO: under alternate_* keys (`objective_inputs.side`)
            alternate = collate([f["alternate"] for f in forget], self.pad_id)
            batch["forget"].update({ALTERNATE_PREFIX + k: v for k, v in alternate.items()})
        if "retain" in items[0]:
            batch["retain"] = collate([item["retain"] for item in items], self.pad_id)
        return batch
