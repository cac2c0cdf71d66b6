"""The two terms of a step, each a catalog entry (`catalog.OBJECTIVES`, `catalog.RETAIN_TERMS`) whose loss the one
function of its kind of input computes (`objective_inputs.loss`): the Trainer reads what an entry declares (its
reference, its substitute answers, the parameters it trains), never its name."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import objective_inputs
from ..catalog import RETAIN_TERMS, Resolved, resolve


@dataclass(frozen=True)
class Term:
    entry: Resolved
    options: dict = field(default_factory=dict)  # what its kind reads beyond the hyper-parameters (RR's layer, ...)

    @property
    def needs_model(self) -> bool:
        """It reads the starting model itself (its distribution, its hidden states)."""
        return self.entry.objective.needs_reference_model

    @property
    def needs_logprobs(self) -> bool:
        """It reads the starting model's log-probabilities of the forget answers."""
        return self.entry.objective.needs_ref

    @property
    def reads_alternate(self) -> bool:
        """It reads substitute answers for the forget questions (PO, DPO)."""
        return self.entry.objective.reads_alternate

    @property
    def needs_alternate_logprobs(self) -> bool:
        return self.needs_logprobs and self.reads_alternate

    def loss(self, model, batch, reference, backend):
        """The entry's loss of ``model`` on ``batch``; ``reference``: the run's `reference.StartingModel`."""
        return objective_inputs.loss(self.entry, model, batch, reference.state(batch), backend=backend,
                                     **self.options)

    def trained_parameters(self, model):
        """Names of the only parameters it trains (RMU), or None: every trainable one."""
        return objective_inputs.trained_parameters(self.entry, model)


def objective_term(name, hparams) -> Term:
    """Objective ``name`` of the catalog with ``hparams``; ValueError naming ``objective`` or ``hparams``."""
    try:
        return Term(resolve(name, dict(hparams)))
    except ValueError as err:
        raise ValueError(f"objective/hparams: {err}") from None


def retain_term(name, objective: Term) -> Term | None:
    """Retain term ``name`` (None for "none"); an RR term reads the objective's layer when it has one. ValueError
    naming ``retain_objective``."""
    if name == "none":
        return None
    if name not in RETAIN_TERMS:
        raise ValueError(f"retain_objective: unknown {name!r}; valid: {', '.join([*RETAIN_TERMS, 'none'])}")
    return Term(objective_inputs.resolved(name), {"layer": objective.entry.hparams.get("layer")})
