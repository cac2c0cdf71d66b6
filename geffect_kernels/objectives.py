"""Every unlearning objective of `catalog` as a loss to minimize, on top of the token primitive.

Token-level objectives (``ga, wga, satimp, tnpo, wtnpo, nll``) are ``scale · Σ_t w_t ℓ_t`` with
detached weights, which a backend may fuse into one pass that also yields the gradients.
Sequence-level ones (``npo, simnpo``) go through ``token_logprobs`` and autograd.
Means run over the valid tokens (sequences with at least one valid token) of the whole batch; a batch
with nothing valid gives 0 and zero gradients. `unlearning_loss_from_logprobs` is every objective as a
function of the log-probabilities: what the fused backends compute, and what the profiler and the
data-parallel objectives differentiate.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .backends.registry import own_or_fallback
from .catalog import IGNORE_INDEX, LOGPROB_PAIR, LOGPROBS, OBJECTIVES, OWN_DISTRIBUTION, Resolved, resolve
from .inputs import (check_mask, check_tensor, drop_first_answer_tokens, prepare_head, prepare_logits,
                     prepare_logprobs, prepare_ref)


def unlearning_loss_from_logprobs(name, logprobs, labels, *, ref_logprobs=None, ignore_index=IGNORE_INDEX,
                                  shift=False, check_values=None, **hparams):
    """Objective ``name`` as a function of the per-token log-probabilities ℓ_t (`token_logprobs`), differentiable
    in ``logprobs``; plain torch, whatever the shape of the model that produced them.

    With V the positions whose label is not ``ignore_index`` and w_t = token_weight(ℓ_t, ℓ_ref,t) detached
    (`catalog`), a token-level objective is

        L = sign · Σ_{t ∈ V} w_t ℓ_t / max(|V|, 1)

    and a sequence-level one, over the S sequences (rows of ``[B, T]`` input) with n_s ≥ 1 valid tokens,

        L = Σ_s sequence_loss(Σ_{t ∈ V_s} ℓ_t, Σ_{t ∈ V_s} ℓ_ref,t, n_s) / max(S, 1).

    ``name``: an objective of `catalog.OBJECTIVES` (with its hyper-parameters), or one `catalog.resolve` returned.
    ``labels`` are shaped like ``logprobs``, or, with ``shift=True``, the Hugging Face labels one position longer
    (the first dropped); ``ref_logprobs`` are shaped like ``logprobs``. Values at ignored positions are ignored.
    """
    objective = _resolved(name, hparams)
    labels = _own_distribution_labels(objective, labels, ignore_index)
    labels = prepare_logprobs(logprobs, labels, ignore_index=ignore_index, shift=shift, check_values=check_values)
    ref = prepare_ref(ref_logprobs, labels.reshape(-1), logprobs.shape, logprobs.dtype, ignore_index=ignore_index,
                      required_by=objective.name if objective.objective.needs_ref else None, check_values=check_values)
    ref = None if ref is None else ref.reshape(logprobs.shape)
    return _from_logprobs(objective, logprobs, labels != ignore_index, ref)


def _own_distribution_labels(objective: Resolved, labels, ignore_index):
    """CE-U's labels: without each row's first ``ignore_first`` answer tokens (before any shift, as open-unlearning)."""
    if objective.objective.inputs != OWN_DISTRIBUTION or not isinstance(labels, torch.Tensor):
        return labels
    return drop_first_answer_tokens(labels, objective.hparams["ignore_first"], ignore_index)


def _check_own_distribution(objective: Resolved, vocab):
    if objective.objective.inputs == OWN_DISTRIBUTION and vocab < 2:
        raise ValueError(f"objective {objective.name!r} needs a vocabulary of at least 2 entries (its target is the "
                         f"distribution without the label), got {vocab}")


def _resolved(name, hparams, kind=LOGPROBS) -> Resolved:
    """``name`` resolved, refused unless it reads inputs of ``kind``: the others are computed from what they read
    (`objective_inputs.loss`)."""
    if isinstance(name, Resolved):
        if hparams:
            raise ValueError(f"objective {name.name!r} is already resolved; pass its hyper-parameters to resolve")
        objective = name
    else:
        objective = resolve(name, hparams)
    # CE-U reads its own distribution over a head, and its gradient is a weighted one of ℓ_t
    inputs = objective.objective.inputs
    if inputs != kind and not (kind == LOGPROBS and inputs == OWN_DISTRIBUTION):
        hint = "pair_loss_from_logprobs" if objective.objective.inputs == LOGPROB_PAIR else "objective_inputs.loss"
        raise ValueError(f"objective {objective.name!r} reads {objective.objective.inputs}, not one batch's token "
                         f"log-probabilities: compute it with {hint}")
    return objective


def _from_logprobs(objective: Resolved, logprobs, valid, ref=None):
    """`unlearning_loss_from_logprobs` on checked inputs: ``valid`` marks the scored positions and ``ref`` is 0
    elsewhere."""
    o, hp = objective.objective, objective.hparams
    if o.token_weight is not None:  # token-level (and CE-U, whose level is its distribution's)
        if o.token_loss is not None:  # a per-token loss whose gradient is w_t ∇ℓ_t (CE-U's, less its constant)
            per_token = o.token_loss(torch.where(valid, logprobs, -1.0), hp)
            return o.sign * torch.where(valid, per_token, 0).sum() / valid.sum().clamp_min(1)
        w = objective.weighting.weights(logprobs, ref)
        return o.sign * torch.where(valid, w * logprobs, 0).sum() / valid.sum().clamp_min(1)
    if logprobs.dim() != 2:
        raise ValueError(f"objective {o.name!r} averages over sequences and needs batched input "
                         f"([B, T] log-probabilities, [B, T, H] hidden or [B, T, V] logits)")
    counts = valid.sum(-1)
    ref_seq = None if ref is None else torch.where(valid, ref, 0).sum(-1)
    losses = o.sequence_loss(torch.where(valid, logprobs, 0).sum(-1), ref_seq, counts.clamp_min(1), hp)
    present = counts > 0
    return torch.where(present, losses, 0).sum() / present.sum().clamp_min(1)


def _loss(objective, prep, ref, *, weighted, logprobs, own_target=None):
    """A token-level objective through the backend's fused ``weighted(opts)``; CE-U through ``own_target(opts,
    β = inf)``, the cross-entropy to the model's own distribution without the label; a sequence-level one from
    the backend's ``logprobs(opts)`` and `_from_logprobs`."""
    opts = prep.opts
    valid = prep.labels != opts.ignore_index
    if objective.objective.inputs == OWN_DISTRIBUTION:
        return own_target(replace(opts, scale=1.0 / valid.sum().clamp_min(1).double()), math.inf)
    if objective.objective.level == "token":
        # 1/n_valid stays on the device (a 0-d tensor): no synchronization
        scale = objective.objective.sign / valid.sum().clamp_min(1).double()
        return weighted(replace(opts, weighting=objective.weighting, scale=scale))
    shape = prep.out_shape
    return _from_logprobs(objective, logprobs(opts).reshape(shape), valid.reshape(shape),
                          None if ref is None else ref.reshape(shape))


def unlearning_loss(name, hidden, weight, labels, *, ref_logprobs=None, bias=None, ignore_index=IGNORE_INDEX,
                    softcap=None, shift=False, backend="auto", check_values=None, **hparams):
    """The scalar loss of objective ``name`` (`catalog.OBJECTIVES`) over a linear LM head.

    ``ref_logprobs`` are the reference model's `token_logprobs` on the same batch (same arguments),
    required by ``tnpo``, ``wtnpo`` and ``npo``. Hyper-parameters: ``alpha``, ``beta``, ``gamma``,
    ``delta``, ``eps`` as the objective takes them; ``ceu``: ``ignore_first`` (leading answer tokens of each row
    left out, open-unlearning's default 1). Returns float64 for float64 inputs, else float32.
    ``check_values=True`` (or GEFFECT_CHECK_VALUES=1) also refuses NaN/inf inputs and out-of-range labels,
    at the price of a host-device synchronization; by default a call never waits for the device.
    """
    objective = _resolved(name, hparams)
    labels = _own_distribution_labels(objective, labels, ignore_index)
    prep = prepare_head(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, softcap=softcap,
                        backend=backend, check_values=check_values)
    _check_own_distribution(objective, weight.shape[0])
    ref = prep.reference(ref_logprobs, required_by=objective.name if objective.objective.needs_ref else None)
    args = (prep.hidden, weight, bias, prep.labels)
    return _loss(objective, prep, ref, weighted=lambda o: prep.backend.weighted_loss(*args, ref, o),
                 logprobs=lambda o: prep.backend.token_logprobs(*args, o),
                 own_target=lambda o, beta: prep.backend.target_cross_entropy(*args[:3], None, None, None,
                                                                              prep.labels, o, beta))


def unlearning_loss_from_logits(name, logits, labels, *, ref_logprobs=None, ignore_index=IGNORE_INDEX, softcap=None,
                                shift=False, backend="auto", inplace=False, check_values=None, **hparams):
    """`unlearning_loss` for callers that already hold the logits (``[B, T, V]`` or ``[N, V]``).

    ``inplace=True`` lets a backend overwrite ``logits`` with their gradient (no second N×V buffer);
    the logits are then unusable after the call. Backends without such a kernel ignore it.
    """
    objective = _resolved(name, hparams)
    labels = _own_distribution_labels(objective, labels, ignore_index)
    prep = prepare_logits(logits, labels, ignore_index=ignore_index, shift=shift, softcap=softcap, backend=backend,
                          inplace=inplace, check_values=check_values)
    _check_own_distribution(objective, logits.shape[-1])
    ref = prep.reference(ref_logprobs, required_by=objective.name if objective.objective.needs_ref else None)
    return _loss(objective, prep, ref,
                 weighted=lambda o: prep.backend.weighted_loss_from_logits(prep.hidden, prep.labels, ref, o),
                 logprobs=lambda o: prep.backend.token_logprobs_from_logits(prep.hidden, prep.labels, o),
                 own_target=lambda o, beta: own_or_fallback(prep.backend, "target_cross_entropy_from_logits")(
                     prep.hidden, prep.labels, o, beta))


def pair_loss_from_logprobs(name, win_logprobs, win_labels, lose_logprobs, lose_labels, *, win_ref=None,
                            lose_ref=None, ignore_index=IGNORE_INDEX, shift=False, check_values=None, **hparams):
    """A pair objective (``dpo``) from the token log-probabilities of the preferred (win: the substitute answers) and
    the dispreferred (lose: the forget answers) sequences of each pair, row b of one with row b of the other:

        L = mean_b pair_loss(Σ_t ℓ_win,b,t, Σ_t ℓ_win,ref,b,t, Σ_t ℓ_lose,b,t, Σ_t ℓ_lose,ref,b,t)

    with sums over each row's valid positions (summed, not averaged, log-likelihoods: open-unlearning's
    ``compute_batch_nll``). ``[B, T_win]`` and ``[B, T_lose]`` inputs; labels, shift and ignored positions as in
    `unlearning_loss_from_logprobs`; both references are required when the entry ``needs_ref``.
    """
    objective = _resolved(name, hparams, kind=LOGPROB_PAIR)
    sums = []
    for what, lp, labels, ref in (("win", win_logprobs, win_labels, win_ref),
                                  ("lose", lose_logprobs, lose_labels, lose_ref)):
        if lp.dim() != 2:
            raise ValueError(f"{what}_logprobs must be [B, T], got {tuple(lp.shape)}")
        labels = prepare_logprobs(lp, labels, ignore_index=ignore_index, shift=shift, check_values=check_values)
        flat = labels.reshape(-1)
        r = prepare_ref(ref, flat, lp.shape, lp.dtype, ignore_index=ignore_index,
                        required_by=objective.name if objective.objective.needs_ref else None,
                        check_values=check_values)
        valid = labels != ignore_index
        ref_sum = None if r is None else torch.where(valid, r.reshape(lp.shape), 0).sum(-1)
        sums += [torch.where(valid, lp, 0).sum(-1), ref_sum]
    if sums[0].shape != sums[2].shape:
        raise ValueError(f"win and lose rows must pair up: {sums[0].shape[0]} vs {sums[2].shape[0]} sequences")
    win, win_ref, lose, lose_ref = (torch.zeros_like(sums[0]) if s is None else s for s in sums)
    return objective.objective.pair_loss(win, win_ref, lose, lose_ref, objective.hparams).mean()


def token_weights(name, logprobs, ref_logprobs=None, *, mask=None, **hparams):
    """The detached per-token weights objective ``name`` applies to ∇ℓ_t, for analysis and plots.

    ``logprobs`` (and ``ref_logprobs``) are `token_logprobs` outputs; ``mask`` marks the valid
    positions (default: all). Weights are 0 at masked positions. Sequence-level objectives need
    ``[B, T]`` input and broadcast each sequence's weight over its tokens: NPO's 2σ(β(ℓ_seq − ℓ_ref,seq))
    and SimNPO's 2σ(βℓ_seq/n_seq + βδ) (its gradient also divides by n_seq). ``nll`` reports 1 (its
    loss carries the sign −1).
    """
    resolved = resolve(name, hparams)
    objective = resolved.objective
    check_tensor("logprobs", logprobs)
    lp = logprobs.detach()
    valid = check_mask(mask, lp.shape, "logprobs")
    valid = torch.ones_like(lp, dtype=torch.bool) if valid is None else valid
    ref = None
    if objective.needs_ref:
        if ref_logprobs is None:
            raise ValueError(f"objective {name!r} needs ref_logprobs")
        check_tensor("ref_logprobs", ref_logprobs, where=valid)
        if ref_logprobs.shape != lp.shape:
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} does not match logprobs "
                             f"{tuple(lp.shape)}")
        ref = torch.where(valid, ref_logprobs.detach().to(lp.dtype), 0)  # the weights take logprobs' dtype
    lp = torch.where(valid, lp, 0)
    if objective.token_weight is not None:
        w = resolved.weighting.weights(lp, ref)
    elif objective.sequence_weight is None:
        raise ValueError(f"objective {name!r} reads {objective.inputs}: its gradient is not a weighted one of the "
                         f"token log-probabilities, so it has no token weights")
    else:
        if lp.dim() != 2:
            raise ValueError(f"objective {name!r} has per-sequence weights and needs [B, T] logprobs")
        seq_w = objective.sequence_weight(lp.sum(-1), None if ref is None else ref.sum(-1),
                                          valid.sum(-1).clamp_min(1), resolved.hparams)
        w = seq_w.unsqueeze(-1).expand_as(lp)
    return torch.where(valid, w, 0)


__all__ = ["IGNORE_INDEX", "OBJECTIVES", "pair_loss_from_logprobs", "token_weights", "unlearning_loss",
           "unlearning_loss_from_logits", "unlearning_loss_from_logprobs"]
