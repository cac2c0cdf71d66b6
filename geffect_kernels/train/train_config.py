"""Settings of one training run: what is minimized, how, and where it is written."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..geffect.groups import MODES as GROUPINGS
from ..guidance import GUIDANCES, TEMPERATURE, parse_stop_when
from .. import catalog
from ..catalog import OBJECTIVES, resolve
from ..ranges import NON_NEGATIVE, POSITIVE, check_number
from ..structured_files import read_yaml  # noqa: F401  (the settings file reader, used with TrainConfig)
from ..retain import KL_REDUCTIONS
from .presets import check_preset, fill_settings

# The retain terms this loop trains with: catalog.RETAIN_OBJECTIVES (nll, kl, rr, none)
RETAIN_OBJECTIVES = catalog.RETAIN_OBJECTIVES
# open-unlearning's PDU (configs/trainer/PDU.yaml at d3d7cf9): dual_step_size 1.0
DUAL_STEP_SIZE = 1.0
# KL retain term: mean over the answer tokens, or the official code's kl_div(reduction="batchmean") over every
# position of the batch (prompt and padding included): kl_loss's reductions
KL_NORMALIZATIONS = KL_REDUCTIONS
REFERENCE_DEVICES = (None, "cpu")


@dataclass
class TrainConfig:
    """The loop minimizes ``forget_weight · L_objective(D_forget) + retain_weight · L_retain(D_retain)``.

    With ``objective="nll"`` and ``retain_objective="none"`` it is plain fine-tuning on the "forget" data.
    """

    objective: str = "ga"
    hparams: dict = field(default_factory=dict)  # the objective's alpha/beta/gamma/delta/layer/coeff
    retain_objective: str = "nll"  # nll, kl, rr or none
    alternate: str | None = None  # substitute answers (PO, DPO): TOFU's idontknow.jsonl or a TOFU-format file
    primal_dual: float | None = None  # PDU: keep the retain loss ≤ this ε, its weight λ a dual variable
    dual_step_size: float | None = None  # PDU's η (None: DUAL_STEP_SIZE): λ ← max(0, λ + η (retain loss − ε))
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    steps: int = 30  # optimizer steps
    batch_size: int = 8  # samples per micro-batch, per side
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then linear decay to 0 at ``steps``
    max_grad_norm: float | None = 1.0
    seed: int = 0
    geffect_every: int = 0  # profile G-effects every k steps (0: never)
    geffect_groups: str = "layer"
    eval_every: int = 0  # call the run's evaluate hook every k steps (0: never)
    checkpoint_every: int = 10
    out_dir: str | None = None  # metrics, checkpoints, final model; None: keep nothing on disk
    backend: str = "auto"
    progress: bool = True
    kl_normalization: str = "tokens"  # see KL_NORMALIZATIONS
    preset: str | None = None  # "official": the G-effect code's settings for those not given (presets.py)
    guidance: str | None = None  # "rectify" or "instance": a G-effect-guided step (guidance/, docs/guidance.md)
    guidance_temperature: float = TEMPERATURE  # instance weighting's temperature τ
    stop_when: str | None = None  # stop rules on the recorded G-effects, e.g. "retain_ratio<-0.5" (guidance.stop)
    gradient_checkpointing: bool = False  # recompute each decoder block in the backward (non-reentrant)
    reference_device: str | None = None  # "cpu": a full fine-tuning KL reference kept on the CPU

    def __new__(cls, *args, **kwargs):
        # remember which settings the caller gave, so that a preset fills exactly the others: a value given on
        # purpose wins even when it equals this project's default
        config = super().__new__(cls)
        config.given = frozenset(f.name for f in dataclasses.fields(cls)[:len(args)]) | frozenset(kwargs)
        return config

    def __post_init__(self):
        _check_text_fields(self)
        check_preset(self.preset)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if not isinstance(self.hparams, dict):
            raise ValueError(f"hparams must be a mapping NAME: NUMBER (e.g. beta: 0.5), got {self.hparams!r}")
        fill_settings(self)
        if self.kl_normalization not in KL_NORMALIZATIONS:
            raise ValueError(f"unknown kl_normalization {self.kl_normalization!r}; valid: "
                             f"{', '.join(KL_NORMALIZATIONS)}")
        resolve(self.objective, self.hparams)  # unknown names and values out of range fail here, not at step 1
        if self.retain_objective not in RETAIN_OBJECTIVES:
            raise ValueError(f"unknown retain objective {self.retain_objective!r}; valid: "
                             f"{', '.join(RETAIN_OBJECTIVES)}")
        self._check_primal_dual()
        if self.geffect_groups not in GROUPINGS:
            raise ValueError(f"unknown geffect_groups {self.geffect_groups!r}; valid: {', '.join(GROUPINGS)}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "geffect_every", "eval_every", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.reference_device not in REFERENCE_DEVICES:
            raise ValueError(f"reference_device must be None (the model's device) or 'cpu', "
                             f"got {self.reference_device!r}")
        check_number("lr", self.lr, POSITIVE)
        for name in ("weight_decay", "forget_weight", "retain_weight"):
            check_number(name, getattr(self, name), NON_NEGATIVE)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm (or None)", self.max_grad_norm, POSITIVE)
        self._check_guidance()

    def _check_primal_dual(self):
        if self.primal_dual is None:
            return
        check_number("primal_dual (the retain loss bound ε)", self.primal_dual, NON_NEGATIVE)
        if self.dual_step_size is not None:
            check_number("dual_step_size", self.dual_step_size, POSITIVE)
        if not self.uses_retain:
            raise ValueError("primal_dual bounds the retain loss: it needs a retain term (retain_objective nll, kl "
                             "or rr) with retain_weight > 0, the dual variable's starting value")
        if self.guidance is not None:
            raise ValueError("primal_dual and guidance both set the retain term's part of the step: choose one")

    def _check_guidance(self):
        if self.guidance is not None and self.guidance not in GUIDANCES:
            raise ValueError(f"unknown guidance {self.guidance!r}; valid: {', '.join(GUIDANCES)} (or None)")
        if self.guidance is not None and not self.resolved_objective.objective.on_forget_logprobs:
            raise ValueError(f"guidance {self.guidance!r} weighs the forget answers' per-sample gradients; objective "
                             f"{self.objective!r} reads {self.resolved_objective.objective.inputs} inputs")
        if self.guidance is not None and not (self.uses_retain and self.retain_objective == "nll"):
            raise ValueError(f"guidance {self.guidance!r} needs the nll retain term with retain_weight > 0 (it steers "
                             f"the forget gradient by the retain risk's), got retain_objective="
                             f"{self.retain_objective!r}, retain_weight={self.retain_weight!r}")
        check_number("guidance_temperature", self.guidance_temperature, POSITIVE)
        if parse_stop_when(self.stop_when) and not self.geffect_every:
            raise ValueError(f"stop_when {self.stop_when!r} reads the recorded G-effects: set geffect_every > 0")

    @property
    def uses_retain(self) -> bool:
        return self.retain_objective != "none" and self.retain_weight != 0

    @property
    def dual_step(self) -> float:
        return DUAL_STEP_SIZE if self.dual_step_size is None else float(self.dual_step_size)

    @property
    def resolved_objective(self) -> catalog.Resolved:
        """The objective with its hyper-parameters checked and defaults filled in."""
        return resolve(self.objective, self.hparams)

    @property
    def retain_term(self) -> catalog.Objective:
        """The retain term's catalog entry (`catalog.RETAIN_TERMS`; ``none``: NLL's, unused)."""
        return catalog.RETAIN_TERMS.get(self.retain_objective, catalog.RETAIN_TERMS["nll"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def _check_text_fields(config):
    """Text settings are text, mappings are mappings (from YAML, anything may arrive): ValueError naming the
    setting, before any check that would compare or hash the value. Numbers are checked where they are read."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if kind in ("str", "str | None") and not (isinstance(value, str) or value is None and kind != "str"):
            raise ValueError(f"{f.name} must be text, got {_short(value)}")
        if kind == "dict" and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise ValueError(f"{f.name} must be a mapping NAME: NUMBER (e.g. beta: 0.5), got {_short(value)}")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {_short(value)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
