"""Every unlearning objective of DESIGN §3 as a loss to minimize, on top of the token primitive.

Token-level objectives (``ga, wga, satimp, tnpo, wtnpo, nll``) are ``scale · Σ_t w_t ℓ_t`` with
detached weights, which a backend may fuse into one pass that also yields the gradients.
Sequence-level ones (``npo, simnpo``) go through ``token_logprobs`` and autograd.
Means run over the valid tokens (sequences with at least one valid token) of the whole batch; a batch
with nothing valid gives 0 and zero gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .inputs import check_mask, check_softcap, check_tensor, out_dtype, prepare_head, prepare_logits, prepare_ref
from .ranges import check_hparams
from .backends.registry import get_backend
from .weighting import (TokenWeighting, npo_sequence_losses, npo_sequence_weights, simnpo_sequence_losses,
                        simnpo_sequence_weights)


@dataclass(frozen=True)
class Objective:
    level: str  # "token" or "sequence"
    defaults: dict
    needs_ref: bool = False
    weighting: str = "one"  # TokenWeighting kind (token level)
    sign: float = 1.0  # +1: minimize log-likelihood (forget); −1: maximize it (retain)


OBJECTIVES = {
    "ga": Objective("token", {}),
    "wga": Objective("token", {"alpha": 1.0}, weighting="wga"),
    "satimp": Objective("token", {"alpha": 5.0, "gamma": 1.0}, weighting="satimp"),
    "tnpo": Objective("token", {"beta": 4.0}, needs_ref=True, weighting="tnpo"),
    "wtnpo": Objective("token", {"alpha": 1.0, "beta": 4.0}, needs_ref=True, weighting="wtnpo"),
    "npo": Objective("sequence", {"beta": 0.1}, needs_ref=True),
    "simnpo": Objective("sequence", {"beta": 2.5, "delta": 0.0}),
    "nll": Objective("token", {}, sign=-1.0),
}


def resolve(name, hparams):
    """The objective's spec and its hyper-parameters with defaults filled in; ValueError when unknown."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    spec = OBJECTIVES[name]
    unknown = set(hparams) - set(spec.defaults)
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise ValueError(f"objective {name!r} takes no hyper-parameter {', '.join(sorted(unknown))}; "
                         f"valid: {valid}")
    return spec, check_hparams({**spec.defaults, **hparams})


def _weighting(spec, hp):
    return TokenWeighting(spec.weighting, **{k: float(v) for k, v in hp.items() if k in ("alpha", "beta", "gamma")})


def objective_loss(name, spec, hp, prep, ref, ignore_index, *, weighted, logprobs):
    """The loss of a resolved objective from the backend's two entry points (shared with the profiler):
    ``weighted(weighting, scale)`` for token-level objectives, ``logprobs()`` for per-sequence ones."""
    valid = prep.labels != ignore_index
    if spec.level == "token":
        n_valid = int(valid.sum())
        return weighted(_weighting(spec, hp), spec.sign / max(n_valid, 1))
    if len(prep.out_shape) != 2:
        raise ValueError(f"objective {name!r} averages over sequences and needs batched input "
                         f"([B, T, H] hidden or [B, T, V] logits)")
    lp = logprobs().reshape(prep.out_shape)
    counts = valid.reshape(prep.out_shape).sum(-1)
    if name == "npo":
        losses = npo_sequence_losses(lp.sum(-1), ref.reshape(prep.out_shape).sum(-1), hp["beta"])
    else:
        losses = simnpo_sequence_losses(lp.sum(-1), counts.clamp_min(1), hp["beta"], hp["delta"])
    present = counts > 0
    return torch.where(present, losses, 0).sum() / present.sum().clamp_min(1)


def unlearning_loss(name, hidden, weight, labels, *, ref_logprobs=None, bias=None, ignore_index=-100,
                    softcap=None, shift=False, backend="auto", **hparams):
    """The scalar loss of objective ``name`` (DESIGN §3) over a linear LM head.

    ``ref_logprobs`` are the reference model's `token_logprobs` on the same batch (same arguments),
    required by ``tnpo``, ``wtnpo`` and ``npo``. Hyper-parameters: ``alpha``, ``beta``, ``gamma``,
    ``delta`` as the objective takes them. Returns float64 for float64 inputs, else float32.
    """
    spec, hp = resolve(name, hparams)
    prep = prepare_head(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift)
    softcap = check_softcap(softcap)
    ref = prepare_ref(ref_logprobs, prep, out_dtype(hidden.dtype), ignore_index=ignore_index,
                      required_by=name if spec.needs_ref else None)
    impl = get_backend(backend, prep.hidden)
    args = (prep.hidden, weight, bias, prep.labels)
    return objective_loss(
        name, spec, hp, prep, ref, ignore_index,
        weighted=lambda weighting, scale: impl.weighted_loss(
            *args, ref, ignore_index=ignore_index, softcap=softcap, weighting=weighting, scale=scale),
        logprobs=lambda: impl.token_logprobs(*args, ignore_index=ignore_index, softcap=softcap))


def unlearning_loss_from_logits(name, logits, labels, *, ref_logprobs=None, ignore_index=-100, softcap=None,
                                shift=False, backend="auto", inplace=False, **hparams):
    """`unlearning_loss` for callers that already hold the logits (``[B, T, V]`` or ``[N, V]``).

    ``inplace=True`` lets a backend overwrite ``logits`` with their gradient (no second N×V buffer);
    the logits are then unusable after the call. Backends without such a kernel ignore it.
    """
    spec, hp = resolve(name, hparams)
    prep = prepare_logits(logits, labels, ignore_index=ignore_index, shift=shift)
    softcap = check_softcap(softcap)
    ref = prepare_ref(ref_logprobs, prep, out_dtype(logits.dtype), ignore_index=ignore_index,
                      required_by=name if spec.needs_ref else None)
    impl = get_backend(backend, prep.hidden)
    return objective_loss(
        name, spec, hp, prep, ref, ignore_index,
        weighted=lambda weighting, scale: impl.weighted_loss_from_logits(
            prep.hidden, prep.labels, ref, ignore_index=ignore_index, softcap=softcap, weighting=weighting,
            scale=scale, inplace=inplace),
        logprobs=lambda: impl.token_logprobs_from_logits(prep.hidden, prep.labels, ignore_index=ignore_index,
                                                         softcap=softcap))


def token_weights(name, logprobs, ref_logprobs=None, *, mask=None, **hparams):
    """The detached per-token weights objective ``name`` applies to ∇ℓ_t, for analysis and plots.

    ``logprobs`` (and ``ref_logprobs``) are `token_logprobs` outputs; ``mask`` marks the valid
    positions (default: all). Weights are 0 at masked positions. Sequence-level objectives need
    ``[B, T]`` input and broadcast each sequence's weight over its tokens: NPO's 2σ(β(ℓ_seq − ℓ_ref,seq))
    and SimNPO's 2σ(βℓ_seq/n_seq + βδ) (its gradient also divides by n_seq). ``nll`` reports 1 (its
    loss carries the sign −1).
    """
    spec, hp = resolve(name, hparams)
    check_tensor("logprobs", logprobs)
    lp = logprobs.detach()
    valid = check_mask(mask, lp.shape, "logprobs")
    valid = torch.ones_like(lp, dtype=torch.bool) if valid is None else valid
    if spec.needs_ref:
        if ref_logprobs is None:
            raise ValueError(f"objective {name!r} needs ref_logprobs")
        check_tensor("ref_logprobs", ref_logprobs, where=valid)
        if ref_logprobs.shape != lp.shape:
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} does not match logprobs "
                             f"{tuple(lp.shape)}")
        ref = torch.where(valid, ref_logprobs.detach().to(lp.dtype), 0)  # the weights take logprobs' dtype
    lp = torch.where(valid, lp, 0)
    if spec.level == "token":
        w = _weighting(spec, hp).weights(lp, ref if spec.needs_ref else None)
    else:
        if lp.dim() != 2:
            raise ValueError(f"objective {name!r} has per-sequence weights and needs [B, T] logprobs")
        if name == "npo":
            seq_w = npo_sequence_weights(lp.sum(-1), ref.sum(-1), hp["beta"])
        else:
            seq_w = simnpo_sequence_weights(lp.sum(-1), valid.sum(-1).clamp_min(1), hp["beta"], hp["delta"])
        w = seq_w.unsqueeze(-1).expand_as(lp)
    return torch.where(valid, w, 0)
