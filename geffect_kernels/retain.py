"""Retain and representation objectives (DESIGN §3): KL to a reference model, RMU, RR."""
from __future__ import annotations

from dataclasses import replace

import torch

from .catalog import IGNORE_INDEX
from .inputs import check_mask, check_tensor, prepare_head_pair
from .ranges import check_number

# How kl_loss averages the per-position KL: "tokens" over the positions whose label is not ignored (the answer
# tokens: this project's default); "batchmean" over every position, prompt and padding included, as the official
# G-effect code and TOFU compute it (kl_div(..., reduction="batchmean") on [B·T, V] log-probabilities).
KL_REDUCTIONS = ("tokens", "batchmean")


def kl_loss(hidden, weight, ref_hidden, ref_weight, labels, *, bias=None, ref_bias=None, ignore_index=IGNORE_INDEX,
            softcap=None, shift=False, backend="auto", reduction="tokens", check_values=None):
    """Mean of KL(p_ref,t ‖ p_θ,t) over the full vocabulary, per position, averaged as ``reduction`` says.

    ``reduction="tokens"`` (default): over the positions whose label is not ``ignore_index``;
    ``"batchmean"``: over every position, ignored ones included (then ``labels`` only give the shape; with
    ``shift=False`` on whole sequences this is the official code's and TOFU's batch-mean KL). The reference
    side (``ref_hidden``, ``ref_weight``, ``ref_bias``: the frozen original model) gets no gradient. Both
    heads share the vocabulary, the soft-cap and the dtype; chunked so that neither model's N×V logits exist
    at once. ``check_values``: as in `unlearning_loss`.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown KL reduction {reduction!r}; valid: {', '.join(KL_REDUCTIONS)}")
    prep, ref = prepare_head_pair(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                                  ignore_index=ignore_index, shift=shift, softcap=softcap, backend=backend,
                                  check_values=check_values)
    positions, opts = prep.labels, prep.opts
    if reduction == "batchmean":  # every position counts: labels no backend ignores
        positions, opts = torch.zeros_like(prep.labels), replace(opts, ignore_index=-1)
    n = (positions != opts.ignore_index).sum().clamp_min(1).double()  # on the device: no synchronization
    return prep.backend.kl_divergence(prep.hidden, weight, bias, ref.hidden, ref_weight, ref_bias, positions,
                                      replace(opts, scale=1.0 / n))


# How RMU's and RR's squared errors are averaged over positions: "tokens", over every valid position of the batch
# (this project's default, the official G-effect code's); "samples", over each sequence's valid positions, then over
# the sequences that have one (open-unlearning's compute_activation_loss)
MSE_REDUCTIONS = ("tokens", "samples")


def masked_mean_squared_error(diff, mask, reduction="tokens"):
    """Mean of ``diff²`` over the valid positions and every hidden unit (a mean squared error, as the RMU
    paper's code, open-unlearning and the official G-effect code compute it: a sum over the units would be H
    times larger, and learning rates and G-effect sizes would not transfer), averaged as ``reduction`` says."""
    if reduction not in MSE_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(MSE_REDUCTIONS)}")
    sq = diff.pow(2).mean(-1)
    if mask is None:
        mask = torch.ones(sq.shape, dtype=torch.bool, device=sq.device)
    if mask.shape != sq.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden positions {tuple(sq.shape)}")
    mask = mask.to(torch.bool)
    if reduction == "tokens" or sq.dim() < 2:
        return torch.where(mask, sq, 0).sum() / mask.sum().clamp_min(1)
    counts = mask.sum(-1)
    per_sample = torch.where(mask, sq, 0).sum(-1) / counts.clamp_min(1)
    present = counts > 0
    return torch.where(present, per_sample, 0).sum() / present.sum().clamp_min(1)


def rmu_direction(hidden_size, *, seed=0, dtype=torch.float32, device="cpu"):
    """The fixed random unit vector u of RMU, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=gen, dtype=torch.float64)
    return (u / u.norm()).to(dtype=dtype, device=device)


def rmu_loss(hidden, direction, *, coeff=6.5, mask=None, reduction="tokens"):
    """RMU: mean over valid positions and hidden units of (h_t − c·u)², h the chosen layer's activations on
    forget data (``coeff`` 6.5: the RMU paper's value for Zephyr-7B).

    ``direction`` is u (normalized here); ``mask`` (shaped like ``hidden`` without its last
    dimension) marks the positions that count, e.g. the attention mask; ``reduction``: `MSE_REDUCTIONS`.
    """
    check_tensor("hidden", hidden)
    check_tensor("direction", direction)
    if direction.shape != hidden.shape[-1:] or direction.device != hidden.device:
        raise ValueError(f"direction must be [H] = [{hidden.shape[-1]}] on {hidden.device}, got "
                         f"{tuple(direction.shape)} on {direction.device}")
    if not bool(direction.any()):
        raise ValueError("direction must be non-zero (RMU's random unit vector u; see rmu_direction)")
    coeff = check_number("coeff", coeff)
    mask = check_mask(mask, hidden.shape[:-1], "hidden positions")
    u = direction.to(hidden.dtype) / direction.norm()
    return masked_mean_squared_error(hidden - coeff * u, mask, reduction)


def rr_loss(hidden, ref_hidden, *, mask=None, reduction="tokens"):
    """Representation retention: mean over valid positions and hidden units of (h_t − h_ref,t)² (no gradient
    to the reference); ``reduction``: `MSE_REDUCTIONS`."""
    check_tensor("hidden", hidden)
    check_tensor("ref_hidden", ref_hidden, like=hidden, like_name="hidden")
    mask = check_mask(mask, hidden.shape[:-1], "hidden positions")
    return masked_mean_squared_error(hidden - ref_hidden.detach(), mask, reduction)
