"""One function per kind of input (`catalog.INPUT_KINDS`) turns a model and a batch into a catalog entry's loss.

    loss = objective_inputs.loss(resolve("dpo", {}), model, batch, state)      # what the loop backpropagates
    loss = objective_inputs.loss(RETAIN_TERMS["rr"], model, retain_batch, state)

The loop, the profiler's generic path, the Trainer callback and `geffect train` call `loss` (or `KIND_LOSSES`); which
function runs is the entry's ``inputs``, never its name. A new entry of an existing kind needs no code here; a new
kind is one function in `KIND_LOSSES`.

A forget batch is a Hugging Face batch (``input_ids``, ``attention_mask``, ``labels``) whose substitute answers, when
the forget set has them (`data.EncodedSet.alternates`), ride along under the same keys prefixed ``alternate_``
(`side`). `ReferenceState` holds what an entry compares with: the starting model's log-probabilities of the batch,
the starting model itself, RMU's direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hf
from .catalog import (ALTERNATE, FORGET, HIDDEN, IGNORE_INDEX, LOGPROB_PAIR, LOGPROBS, OWN_DISTRIBUTION,
                      REFERENCE_DISTRIBUTION, RETAIN_TERMS, STEERED_MLPS, Resolved, resolve)
from .head_losses import HEAD_LOSSES
from .layers import layer_hidden, layer_index, rmu_trained_parameters
from .objectives import pair_loss_from_logprobs, unlearning_loss
from .retain import masked_mean_squared_error, rmu_direction

ALTERNATE_PREFIX = "alternate_"


class NonFiniteLoss(ArithmeticError):
    """A loss, or the hidden states it starts from, holds NaN or inf."""


@dataclass
class ReferenceState:
    """What an entry compares with, made once by the caller (the loop per run, the profiler per measurement).

    ``logprobs``, ``alternate_logprobs``: the starting model's `hf.token_logprobs` of the batch's forget and
    substitute answers (HF shift); ``model``: the starting model, a module or an object with ``reference_inputs(batch)``
    and ``layer_hidden(batch, layer)`` (`train.frozen_model`); ``seed``: RMU's direction u.
    """

    logprobs: torch.Tensor | None = None
    alternate_logprobs: torch.Tensor | None = None
    model: object = None
    seed: int = 0

    def direction(self, size, dtype, device) -> torch.Tensor:
        """RMU's fixed random unit vector u (`retain.rmu_direction` of ``seed``)."""
        return rmu_direction(size, seed=self.seed, dtype=dtype, device=device)

    def reference_inputs(self, batch) -> hf.HeadInputs:
        model = self._model("its head inputs")
        with torch.no_grad():
            inputs = getattr(model, "reference_inputs", None)
            return inputs(batch) if inputs is not None else hf.head_inputs(model, batch)

    def reference_hidden(self, batch, layer) -> torch.Tensor:
        model = self._model(f"its layer-{layer} activations")
        with torch.no_grad():
            own = getattr(model, "layer_hidden", None)
            return own(batch, layer) if own is not None else layer_hidden(model, batch, layer)

    def _model(self, what):
        if self.model is None:
            raise ValueError(f"this term compares with the starting model's {what}: pass ReferenceState(model=...)")
        return self.model


def side(batch, which: str):
    """The forget answers (``FORGET``) of a forget batch, or its substitute answers (``ALTERNATE``)."""
    if which == FORGET:
        return {k: v for k, v in batch.items() if not k.startswith(ALTERNATE_PREFIX)}
    alternate = {k[len(ALTERNATE_PREFIX):]: v for k, v in batch.items() if k.startswith(ALTERNATE_PREFIX)}
    if "input_ids" not in alternate:
        raise ValueError("this objective reads substitute answers for the forget questions: give the forget set "
                         "some (--alternate FILE, TrainConfig(alternate=...), or encode_pairs(..., alternates=...))")
    return alternate


def with_alternate(batch, alternate_batch):
    """``batch`` with ``alternate_batch``'s tensors under `ALTERNATE_PREFIX`ed keys (what `side` reads back)."""
    return {**batch, **{ALTERNATE_PREFIX + k: v for k, v in alternate_batch.items()}}


def head_inputs(model, batch) -> hf.HeadInputs:
    """``hf.head_inputs`` with the hidden states checked finite and cast to the head's dtype."""
    x = hf.head_inputs(model, batch)
    if not bool(torch.isfinite(x.hidden).all()):
        raise NonFiniteLoss("the hidden states hold NaN or inf")
    # under autocast the decoder may hand back another dtype than the head's; the kernels need one
    return x._replace(hidden=x.hidden.to(x.weight.dtype))


def _logprobs_loss(objective: Resolved, model, batch, state, *, backend="auto", **_):
    """A token or sequence objective on the answers it reads: the fused loss over the LM head."""
    rows = side(batch, objective.objective.reads)
    ref = state.alternate_logprobs if objective.objective.reads == ALTERNATE else state.logprobs
    ref = ref if objective.objective.needs_ref else None  # a retain term's batch is not the one they describe
    x = head_inputs(model, rows)
    return unlearning_loss(objective, x.hidden, x.weight, x.labels, ref_logprobs=ref, **x.as_kwargs(),
                           backend=backend)


def _pair_loss(objective: Resolved, model, batch, state, *, backend="auto", **_):
    """DPO: the summed log-likelihoods of the substitute (win) and forget (lose) answers against the reference's."""
    win, lose = side(batch, ALTERNATE), side(batch, FORGET)
    xw, xl = head_inputs(model, win), head_inputs(model, lose)
    from .logprobs import token_logprobs

    lw = token_logprobs(xw.hidden, xw.weight, xw.labels, **xw.as_kwargs(), backend=backend)
    ll = token_logprobs(xl.hidden, xl.weight, xl.labels, **xl.as_kwargs(), backend=backend)
    return pair_loss_from_logprobs(objective, lw, xw.labels[:, 1:], ll, xl.labels[:, 1:],
                                   win_ref=state.alternate_logprobs, lose_ref=state.logprobs)


def _distribution_loss(objective: Resolved, model, batch, state, *, backend="auto", **options):
    """The full next-token distribution of ``model`` against the reference's (KL, UNDIAL) or its own (CE-U)."""
    o = objective.objective
    rows = side(batch, o.reads)
    x = head_inputs(model, rows)
    reference = None
    if o.inputs == REFERENCE_DISTRIBUTION:
        r = state.reference_inputs(rows)
        # a frozen reference keeps the dtype the model was loaded in while the trained weights are float32 masters
        # (`train.precision`): the two heads are compared in the trained one's dtype
        reference = r._replace(hidden=r.hidden.to(x.hidden.dtype), weight=r.weight.to(x.weight.dtype),
                               bias=None if r.bias is None else r.bias.to(x.weight.dtype))
    return HEAD_LOSSES[o.head_loss](x, reference, objective.hparams, backend=backend, **options)


def _hidden_loss(objective: Resolved, model, batch, state, *, layer=None, **_):
    """Mean over the answer positions and the hidden units of (h_ℓ − target)², h_ℓ block ℓ's output; ℓ is the
    entry's ``layer`` (else ``layer``, e.g. the objective's for an RR retain term), −1 scaled with depth."""
    o = objective.objective
    rows = side(batch, o.reads)
    value = objective.hparams.get("layer", -1.0)
    index = layer_index(model, layer if layer is not None and value == -1 else value)
    hidden = layer_hidden(model, rows, index)
    target = o.hidden_target(state, rows, index, hidden, objective.hparams)
    # the positions whose own token is an answer token (open-unlearning's mask: labels != -100, unshifted)
    return masked_mean_squared_error(hidden - target, hf.batch_labels(rows) != IGNORE_INDEX)


KIND_LOSSES = {LOGPROBS: _logprobs_loss, LOGPROB_PAIR: _pair_loss, REFERENCE_DISTRIBUTION: _distribution_loss,
               OWN_DISTRIBUTION: _distribution_loss, HIDDEN: _hidden_loss}


def resolved(objective, hparams=None) -> Resolved:
    """A `Resolved` entry: ``objective`` itself, a catalog or retain-term name, or an `Objective`."""
    if isinstance(objective, Resolved):
        return objective
    if isinstance(objective, str) and objective not in RETAIN_TERMS:
        return resolve(objective, hparams or {})
    entry = RETAIN_TERMS[objective] if isinstance(objective, str) else objective
    unknown = set(hparams or {}) - set(entry.defaults)
    if unknown:
        raise ValueError(f"{entry.name!r} takes no hyper-parameter {', '.join(sorted(unknown))}")
    from .ranges import check_hparams

    return Resolved(entry, check_hparams({**entry.defaults, **(hparams or {})}))


def loss(objective, model, batch, state: ReferenceState | None = None, *, backend="auto", **options):
    """The loss of catalog entry ``objective`` (a `Resolved`, a name, or an `Objective`) on ``model`` and ``batch``.

    ``options``: what some kinds read besides the entry's hyper-parameters: ``kl_normalization`` (KL),
    ``layer`` (an RR retain term's layer when its entry leaves it at −1: the objective's).
    """
    objective = resolved(objective)
    return KIND_LOSSES[objective.objective.inputs](objective, model, batch, state or ReferenceState(),
                                                   backend=backend, **options)


# `Objective.trains` -> (model, hparams) -> names of the only parameters trained
TRAINED = {STEERED_MLPS: lambda model, hp: rmu_trained_parameters(model, hp["layer"])}


def trained_parameters(objective, model) -> set[str] | None:
    """Names of the only parameters ``objective`` trains (RMU: a few layers' MLP projections), or None: all."""
    objective = resolved(objective)
    trains = objective.objective.trains
    return None if trains is None else TRAINED[trains](model, objective.hparams)


__all__ = ["ALTERNATE_PREFIX", "HIDDEN", "KIND_LOSSES", "NonFiniteLoss", "ReferenceState", "head_inputs", "loss",
           "resolved", "side", "trained_parameters", "with_alternate"]
