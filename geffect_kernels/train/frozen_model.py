"""The frozen reference: a copy of the starting model, and its per-sample log-probabilities cached so
each forget sample goes through the reference once per run, not once per step."""
from __future__ import annotations

import copy

import torch

from .. import hf


def frozen_copy(model):
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class RefLogprobCache:
    """ℓ_ref,t of every sample of ``data`` (an EncodedSet), computed on first use and kept."""

    def __init__(self, reference, data, *, backend="auto"):
        self.reference, self.data, self.backend = reference, data, backend
        self._cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def batch(self, indices, width: int, device) -> torch.Tensor:
        """``[B, width - 1]`` reference log-probabilities (HF shift), zero past each sample's end."""
        missing = sorted({i for i in indices if i not in self._cache})
        if missing:
            batch = {k: v.to(device) for k, v in self.data.batch(missing).items()}
            logprobs = hf.token_logprobs(self.reference, batch, backend=self.backend).float()
            for row, i in enumerate(missing):
                self._cache[i] = logprobs[row, : len(self.data.examples[i]["input_ids"]) - 1].clone()
        out = torch.zeros(len(indices), width - 1, device=device)
        for row, i in enumerate(indices):
            out[row, : len(self._cache[i])] = self._cache[i]
        return out
