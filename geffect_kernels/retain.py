"""Retain and representation objectives (DESIGN §3): KL to a reference model, RMU, RR."""
from __future__ import annotations

import torch

from .backends.registry import get_backend
from .inputs import check_mask, check_softcap, check_tensor, prepare_head
from .ranges import check_number


def kl_loss(hidden, weight, ref_hidden, ref_weight, labels, *, bias=None, ref_bias=None, ignore_index=-100,
            softcap=None, shift=False, backend="auto"):
    """Mean over valid positions of KL(p_ref,t ‖ p_θ,t) over the full vocabulary.

    The reference side (``ref_hidden``, ``ref_weight``, ``ref_bias``: the frozen original model) gets
    no gradient. Both heads share the vocabulary, the soft-cap and the dtype; chunked so that neither
    model's N×V logits exist at once. ``labels`` only mark which positions count.
    """
    prep = prepare_head(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift)
    ref = prepare_head(ref_hidden, ref_weight, labels, ref_bias, ignore_index=ignore_index, shift=shift)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"the two heads have different vocabularies: {weight.shape[0]} vs {ref_weight.shape[0]}")
    if ref_hidden.dtype != hidden.dtype or ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden ({ref_hidden.dtype}, {ref_hidden.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    n_valid = int((prep.labels != ignore_index).sum())
    impl = get_backend(backend, prep.hidden)
    return impl.kl_divergence(prep.hidden, weight, bias, ref.hidden, ref_weight, ref_bias, prep.labels,
                              ignore_index=ignore_index, softcap=check_softcap(softcap), scale=1.0 / max(n_valid, 1))


def _masked_mean_squared_error(diff, mask):
    """Mean of ``diff²`` over the valid positions and every hidden unit (a mean squared error, as the RMU
    paper's code, open-unlearning and the official G-effect code compute it: a sum over the units would be H
    times larger, and learning rates and G-effect sizes would not transfer)."""
    sq = diff.pow(2).mean(-1)
    if mask is None:
        return sq.mean() if sq.numel() else sq.sum()
    if mask.shape != sq.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden positions {tuple(sq.shape)}")
    mask = mask.to(torch.bool)
    return torch.where(mask, sq, 0).sum() / mask.sum().clamp_min(1)


def rmu_direction(hidden_size, *, seed=0, dtype=torch.float32, device="cpu"):
    """The fixed random unit vector u of RMU, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=gen, dtype=torch.float64)
    return (u / u.norm()).to(dtype=dtype, device=device)


def rmu_loss(hidden, direction, *, coeff=6.5, mask=None):
    """RMU: mean over valid positions and hidden units of (h_t − c·u)², h the chosen layer's activations on
    forget data (``coeff`` 6.5: the RMU paper's value for Zephyr-7B).

    ``direction`` is u (normalized here); ``mask`` (shaped like ``hidden`` without its last
    dimension) marks the positions that count, e.g. the attention mask.
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
    return _masked_mean_squared_error(hidden - coeff * u, mask)


def rr_loss(hidden, ref_hidden, *, mask=None):
    """Representation retention: mean over valid positions and hidden units of (h_t − h_ref,t)² (no gradient
    to the reference)."""
    check_tensor("hidden", hidden)
    check_tensor("ref_hidden", ref_hidden, like=hidden, like_name="hidden")
    mask = check_mask(mask, hidden.shape[:-1], "hidden positions")
    return _masked_mean_squared_error(hidden - ref_hidden.detach(), mask)
