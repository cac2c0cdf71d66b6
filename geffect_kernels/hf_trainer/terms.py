"""The two terms of a step, each a function of (model, batch, reference): the objective on the forget batch and the
retain term on the retain batch, on the fused LM head (`train.losses`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..catalog import resolve
from ..objective_inputs import ReferenceState
from ..train.losses import kl_retain_loss, objective_loss


@dataclass(frozen=True)
class Term:
    """A loss term: ``loss(model, batch, reference, backend)``; ``needs_model``: it reads the starting model itself
    (not only the forget set's reference log-probabilities); ``needs_logprobs``: it reads those."""

    loss: Callable
    needs_model: bool = False
    needs_logprobs: bool = False


def objective_term(name, hparams) -> Term:
    """Objective ``name`` of the catalog with ``hparams``; ValueError naming ``objective`` or ``hparams``."""
    try:
        resolved = resolve(name, dict(hparams))
    except ValueError as err:
        raise ValueError(f"objective/hparams: {err}") from None
    needs_model = resolved.objective.needs_reference_model  # UNDIAL: the starting model's logits

    def loss(model, batch, reference, backend):
        state = ReferenceState(reference.logprobs(batch), model=reference.model if needs_model else None)
        return objective_loss(resolved.name, model, batch, backend=backend, ref_logprobs=state,
                              hparams=resolved.hparams)

    return Term(loss, needs_model=needs_model, needs_logprobs=resolved.objective.needs_ref)


RETAIN_TERMS = {
    "nll": Term(lambda model, batch, reference, backend: objective_loss("nll", model, batch, backend=backend)),
    "kl": Term(lambda model, batch, reference, backend: kl_retain_loss(
        model, reference.model, batch, normalization="tokens", backend=backend), needs_model=True),
    "none": None,
}


def retain_term(name) -> Term | None:
    """Retain term ``name`` (None: none); ValueError naming ``retain_objective``."""
    if name not in RETAIN_TERMS:
        raise ValueError(f"retain_objective: unknown {name!r}; valid: {', '.join(RETAIN_TERMS)}")
    return RETAIN_TERMS[name]
