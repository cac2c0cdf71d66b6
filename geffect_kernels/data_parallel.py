"""Objectives of a *global* batch whose samples are split over the ranks of a process group.

Every objective of DESIGN §3 is a function L(ℓ) of the per-token log-probabilities of the whole batch
(means over all valid tokens or all sequences, weights from detached per-token values), so its gradient
is Σ_t c_t ∇ℓ_t with c_t = ∂L/∂ℓ_t. Each rank computes ℓ on its slice, the ranks gather the ℓ (B·T
numbers, not the vocabulary), every rank takes the c_t of the concatenation and backpropagates
R · Σ_{t ∈ slice} c_t ℓ_t. FSDP2 averages gradients over the R ranks, so the result is exactly one
process's gradient of L on the concatenated batch, and the loss value every rank reports is L itself.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import hf
from .catalog import IGNORE_INDEX, resolve
from .objectives import unlearning_loss_from_logprobs


def comm_device() -> torch.device:
    """Where the group's collectives take tensors: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous slice of ``n`` samples; the first ``n mod world`` ranks take one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def gather_rows(tensors: list[torch.Tensor], pads: list) -> tuple[list[torch.Tensor], slice]:
    """Every rank's ``[b_r, T_r]`` tensors stacked along the rows in rank order (padded to the longest T
    with ``pads``), and the rows that are this rank's."""
    world, rank, device = dist.get_world_size(), dist.get_rank(), comm_device()
    b, t = tensors[0].shape
    sizes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([b, t], device=device))
    rows, width = max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes)
    out = []
    for x, pad in zip(tensors, pads):
        padded = torch.full((rows, width), pad, dtype=x.dtype, device=device)
        padded[:b, :t] = x.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([part[: int(s[0])] for part, s in zip(parts, sizes)]).to(tensors[0].device))
    start = sum(int(s[0]) for s in sizes[:rank])
    return out, slice(start, start + b)


def objective_part(name, model, batch, *, ref_logprobs=None, backend="auto", **hparams):
    """(R · this rank's part of objective ``name`` (or a `catalog.resolve`d one) on the global batch, to
    backpropagate; L's value, a float).

    ``batch`` and ``ref_logprobs`` are this rank's slices (HF-style batch, HF-shifted log-probabilities).
    """
    objective = resolve(name, hparams) if isinstance(name, str) else name  # a name, or already resolved
    logprobs = hf.token_logprobs(model, batch, backend=backend)
    labels = hf.batch_labels(batch)[:, 1:]
    tensors, pads = [logprobs.detach().double(), labels], [0.0, IGNORE_INDEX]
    if ref_logprobs is not None:
        tensors.append(ref_logprobs.double())
        pads.append(0.0)
    gathered, mine = gather_rows(tensors, pads)
    flat = gathered[0].requires_grad_()
    with torch.enable_grad():
        loss = unlearning_loss_from_logprobs(objective, flat, gathered[1],
                                             ref_logprobs=gathered[2] if ref_logprobs is not None else None)
        coef, = torch.autograd.grad(loss, flat)
    coef = torch.where(labels != IGNORE_INDEX, coef[mine, : logprobs.shape[1]], 0).to(logprobs.dtype)
    return dist.get_world_size() * (coef * logprobs).sum(), float(loss.detach())


def mean_part(local_mean: torch.Tensor, local_count: int) -> tuple[torch.Tensor, float]:
    """A mean over items split across ranks: (R · n_r/N · mean_r to backpropagate, the global mean)."""
    counts = torch.tensor([float(local_count), float(local_count) * float(local_mean.detach())],
                          dtype=torch.float64, device=comm_device())
    dist.all_reduce(counts)
    total = max(float(counts[0]), 1.0)
    return dist.get_world_size() * local_count / total * local_mean, float(counts[1]) / total
