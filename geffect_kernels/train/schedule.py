"""Pure functions of the step number: which samples a micro-batch holds and the learning-rate factor.
Being stateless is what makes a resumed run identical to an uninterrupted one."""
from __future__ import annotations

import torch


def batch_indices(n_samples: int, batch_size: int, seed: int, micro_batch: int) -> list[int]:
    """Sample indices of micro-batch number ``micro_batch``: epochs are seeded permutations, cut in order.

    An epoch holds ceil(n / batch_size) micro-batches; the last one wraps around to the start of the
    same permutation, so every micro-batch is full and every sample is seen once per epoch or more.
    """
    per_epoch = -(-n_samples // batch_size)
    epoch, position = divmod(micro_batch, per_epoch)
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = position * batch_size
    return [int(order[(start + k) % n_samples]) for k in range(min(batch_size, n_samples))]


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR factor for LambdaLR: linear from 1/(warmup+1) to 1 over the warm-up, then linear to 0 at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor
