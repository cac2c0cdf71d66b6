"""Every objective, defined once: its loss, its source, its defaults, what it reads and its loss function.

Token-level objectives are ``sign · mean_t w_t ℓ_t`` with detached weights w_t = ``token_weight(ℓ_t, ℓ_ref,t)``;
the kernels implement the same weight formulas under ``kernel_code``, a `KernelWeight`. Sequence-level objectives
are ``mean_seq sequence_loss(ℓ_seq, ℓ_ref,seq, n_seq)``. Adding an objective means one entry here, plus, for a new
token weight, a `KernelWeight` and its formula in the kernels (backends/triton/weights.py,
csrc/include/geffect/math.h at the top of the repository). Every backend,
the profiler and `token_weights` read these entries; nothing else lists objectives. The objective as a function
of log-probabilities is `objectives.unlearning_loss_from_logprobs`.

Each entry declares its *inputs* (`INPUT_KINDS`): what it reads of a model and a batch. `objective_inputs` holds one
function per kind that turns (model, batch, reference state) into the entry's loss; the loop, the profiler and the
Trainer callback call that function and never an objective's name.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .ranges import check_hparams

IGNORE_INDEX = -100  # the label of a position no objective scores (Hugging Face's)


# What an objective reads (`Objective.inputs`); `objective_inputs.KIND_LOSSES` maps each to its one function.
LOGPROBS = "logprobs"  # the token log-probabilities of one batch: token and sequence objectives, PO, NLL
LOGPROB_PAIR = "logprob_pair"  # those of a pair of batches (win = the substitute answers, lose = the forget ones)
REFERENCE_DISTRIBUTION = "reference_distribution"  # the full next-token distribution against a reference's
OWN_DISTRIBUTION = "own_distribution"  # the full next-token distribution against its own, detached
HIDDEN = "hidden"  # the hidden states of a chosen layer against a target (RMU's c·u, RR's reference states)
INPUT_KINDS = (LOGPROBS, LOGPROB_PAIR, REFERENCE_DISTRIBUTION, OWN_DISTRIBUTION, HIDDEN)
FORGET, ALTERNATE = "forget", "alternate"  # which answers of a forget batch a LOGPROBS entry reads (`Objective.reads`)
STEERED_MLPS = "steered_mlps"  # `Objective.trains`: the MLP output projections of the steered layer and two below


class KernelWeight(enum.IntEnum):
    """The token-weight formulas the kernels implement, by the code they are launched with. The Triton kernels
    read these constants; C++'s ``WeightKind`` (csrc/include/geffect/math.h) mirrors them by name and value.
    Every kernel refuses a code it has no formula for."""

    ONE = 0  # ga, nll
    WGA = 1  # p^α
    SATIMP = 2  # p^α (1 − p)^γ
    TNPO = 3  # 2p^β / (p^β + p_ref^β + ε)
    WTNPO = 4  # p^α · TNPO's

def _sigmoid_weight(lp, ref, hp):
    """2p^β / (p^β + p_ref^β + ε): with ε = 0 the exact, overflow-free 2σ(β(ℓ − ℓ_ref)); with ε > 0 (the
    official code's 1e-5) in log space, shifted by the larger of βℓ, βℓ_ref."""
    x, x_ref = hp["beta"] * lp, hp["beta"] * ref
    if hp["eps"] == 0:
        return 2 * torch.sigmoid(x - x_ref)
    m = torch.maximum(x, x_ref)
    return 2 * torch.exp(x - m) / (torch.exp(x - m) + torch.exp(x_ref - m) + hp["eps"] * torch.exp(-m))


def _one(lp, ref, hp):
    return torch.ones_like(lp)


def _wga(lp, ref, hp):
    return torch.exp(hp["alpha"] * lp)


def _satimp(lp, ref, hp):
    # (1 − p)^γ through expm1 keeps precision when p → 0
    return torch.exp(hp["alpha"] * lp) * (-torch.expm1(lp)).clamp_min(0) ** hp["gamma"]


def _wtnpo(lp, ref, hp):
    return torch.exp(hp["alpha"] * lp) * _sigmoid_weight(lp, ref, hp)


def _ceu_weight(lp, ref, hp):
    """p/(1 − p) = e^ℓ / (−expm1(ℓ)): CE-U's gradient is this times ∇ℓ_t (infinite where ℓ rounded to 0; the fused
    head losses take it from the logits instead, exp(z_y − LSE_{v≠y}), which stays finite)."""
    return torch.exp(lp - torch.log(-torch.expm1(lp)))


def _ceu_token_loss(lp, hp):
    """−log(1 − p_t): the part of CE-U's per-token loss H(q_t) − log(1 − p_t) that a function of ℓ_t can give; q_t
    is detached, so its gradient is CE-U's (p/(1 − p) ∇ℓ_t). H(q_t) needs the distribution (`unlearning_loss`)."""
    return -torch.log(-torch.expm1(lp))


def _npo_loss(seq, ref_seq, counts, hp):
    return -(2.0 / hp["beta"]) * F.logsigmoid(-hp["beta"] * (seq - ref_seq))


def _npo_weight(seq, ref_seq, counts, hp):
    """∂NPO/∂ℓ_seq · (number of sequences): 2σ(β(ℓ_seq − ℓ_ref,seq))."""
    return 2 * torch.sigmoid(hp["beta"] * (seq - ref_seq))


def _simnpo_loss(seq, ref_seq, counts, hp):
    return -(2.0 / hp["beta"]) * F.logsigmoid(-hp["beta"] * seq / counts - hp["beta"] * hp["delta"])


def _simnpo_weight(seq, ref_seq, counts, hp):
    """2σ(β ℓ_seq/n_seq + βδ); the loss's gradient with respect to ℓ_seq is this over n_seq."""
    return 2 * torch.sigmoid(hp["beta"] * seq / counts + hp["beta"] * hp["delta"])


def _dpo_loss(win, win_ref, lose, lose_ref, hp):
    return -(2.0 / hp["beta"]) * F.logsigmoid(hp["beta"] * ((win - win_ref) - (lose - lose_ref)))


def _steering_target(state, batch, layer, hidden, hp):
    """RMU's target c·u: u the run's fixed random unit vector (`ReferenceState.direction`)."""
    return hp["coeff"] * state.direction(hidden.shape[-1], hidden.dtype, hidden.device)


def _reference_target(state, batch, layer, hidden, hp):
    """RR's target: the starting model's activations at the same layer."""
    return state.reference_hidden(batch, layer).to(hidden.dtype)


@dataclass(frozen=True)
class Objective:
    name: str
    loss: str  # the formula, as docs/DESIGN.md writes it
    source: str
    defaults: dict = field(default_factory=dict)
    needs_ref: bool = False  # compares against a reference model's log-probabilities
    sign: float = 1.0  # +1: lower the log-likelihood (forget); −1: raise it (retain)
    token_weight: Callable | None = None  # (ℓ, ℓ_ref, hp) -> w_t, detached inputs
    kernel_code: KernelWeight | None = None  # the kernels' formula for token_weight
    sequence_loss: Callable | None = None  # (ℓ_seq, ℓ_ref,seq, n_seq, hp) -> per-sequence loss
    sequence_weight: Callable | None = None  # (ℓ_seq, ℓ_ref,seq, n_seq, hp) -> per-sequence weight
    # An objective whose per-token loss is not w_t·ℓ_t but whose gradient is w_t ∇ℓ_t (CE-U): the differentiable part
    # of its value as a function of ℓ_t, (ℓ, hp) -> per-token loss (`objectives.unlearning_loss_from_logprobs`)
    token_loss: Callable | None = None
    inputs: str = LOGPROBS  # what it reads (INPUT_KINDS): which function of `objective_inputs` computes it
    reads: str = FORGET  # LOGPROBS: the forget answers, or the substitute (ALTERNATE) answers paired with them
    pair_loss: Callable | None = None  # LOGPROB_PAIR: (ℓ_win, ℓ_win,ref, ℓ_lose, ℓ_lose,ref, hp) per pair of sequences
    head_loss: str | None = None  # *_DISTRIBUTION: its fused head loss, by its name in `head_losses.HEAD_LOSSES`
    needs_reference_model: bool = False  # reads the starting model itself (its head inputs or hidden states)
    hidden_target: Callable | None = None  # HIDDEN: (state, batch, layer, hidden, hp) -> the target of the MSE
    trains: str | None = None  # the rule naming the only parameters it trains (objective_inputs.TRAINED); None: all

    @property
    def level(self) -> str:
        """How it is computed from its inputs: "token", "sequence" (LOGPROBS), "pair", "distribution", "hidden"."""
        if self.inputs == LOGPROBS:
            return "token" if self.sequence_loss is None else "sequence"
        return {LOGPROB_PAIR: "pair", HIDDEN: "hidden"}.get(self.inputs, "distribution")

    @property
    def reads_alternate(self) -> bool:
        """Whether it reads substitute answers for the forget questions (PO, DPO)."""
        return self.reads == ALTERNATE or self.inputs == LOGPROB_PAIR

    @property
    def on_forget_logprobs(self) -> bool:
        """Whether it is a function of the forget answers' token log-probabilities alone (the profiler's structured
        path, the fused token losses, the data-parallel objectives)."""
        return self.inputs == LOGPROBS and self.reads == FORGET

    @property
    def gradient_on_forget_logprobs(self) -> bool:
        """Whether its gradient is a weighted log-likelihood gradient of the forget answers, Σ_t w_t ∇ℓ_t with w_t
        a function of ℓ_t (`on_forget_logprobs`, and CE-U, whose value needs its distribution): the profiler's
        structured path."""
        return self.on_forget_logprobs or (self.inputs == OWN_DISTRIBUTION and self.token_weight is not None)


_G_EFFECT = "Wang et al., ICLR 2025, Rethinking LLM Unlearning Objectives (G-effect)"
OBJECTIVES = {o.name: o for o in [
    Objective("ga", "mean_t ℓ_t", "gradient ascent; Jang et al., ACL 2023", token_weight=_one,
              kernel_code=KernelWeight.ONE),
    Objective("wga", "mean_t p_t^α ℓ_t", _G_EFFECT, {"alpha": 1.0}, token_weight=_wga,
              kernel_code=KernelWeight.WGA),
    Objective("satimp", "mean_t p_t^α (1 − p_t)^γ ℓ_t", "Yang et al., 2025, SatImp", {"alpha": 5.0, "gamma": 1.0},
              token_weight=_satimp, kernel_code=KernelWeight.SATIMP),
    Objective("tnpo", "mean_t 2p^β / (p^β + p_ref^β + ε) ℓ_t", _G_EFFECT, {"beta": 4.0, "eps": 0.0},
              needs_ref=True, token_weight=_sigmoid_weight, kernel_code=KernelWeight.TNPO),
    Objective("wtnpo", "mean_t p^α 2p^β / (p^β + p_ref^β + ε) ℓ_t", _G_EFFECT,
              {"alpha": 1.0, "beta": 4.0, "eps": 0.0}, needs_ref=True, token_weight=_wtnpo,
              kernel_code=KernelWeight.WTNPO),
    Objective("npo", "−(2/β) mean_seq log σ(−β(ℓ_seq − ℓ_ref,seq))", "Zhang et al., COLM 2024, NPO",
              {"beta": 0.1}, needs_ref=True, sequence_loss=_npo_loss, sequence_weight=_npo_weight),
    Objective("simnpo", "−(2/β) mean_seq log σ(−β ℓ_seq/n_seq − βδ)", "Fan et al., 2024, SimNPO",
              {"beta": 2.5, "delta": 0.0}, sequence_loss=_simnpo_loss, sequence_weight=_simnpo_weight),
    Objective("ceu", "mean_t −Σ_v q_t,v log p_t,v, q_t = sg softmax(z_t with z_t,y = −∞)",
              "CE-U; Yang, 2025, Cross Entropy Unlearning (arXiv:2503.01224); open-unlearning's ceu.py",
              {"ignore_first": 1}, token_weight=_ceu_weight, token_loss=_ceu_token_loss, inputs=OWN_DISTRIBUTION,
              head_loss="ceu"),
    Objective("undial", "mean_t −Σ_v t_t,v log p_t,v, t_t = sg softmax(z_ref,t − β·onehot(y_t))",
              "UNDIAL; Dong et al., NAACL 2025 (arXiv:2402.10052); open-unlearning's compute_undial_loss",
              {"beta": 10.0}, inputs=REFERENCE_DISTRIBUTION, head_loss="undial", needs_reference_model=True),
    Objective("nll", "−mean_t ℓ_t", "maximum likelihood (GD's retain term; PO/IdkPO on substitute answers)",
              sign=-1.0, token_weight=_one, kernel_code=KernelWeight.ONE),
    Objective("po", "−mean_t ℓ_t on the substitute answers", "preference optimization (IdkPO); Maini et al., 2024, "
              "TOFU", sign=-1.0, token_weight=_one, kernel_code=KernelWeight.ONE, reads=ALTERNATE),
    Objective("dpo", "−(2/β) mean_seq log σ(β((ℓ_win − ℓ_win,ref) − (ℓ_lose − ℓ_lose,ref)))",
              "Rafailov et al., NeurIPS 2023, DPO (IdkDPO: win = a refusal); open-unlearning's compute_dpo_loss",
              {"beta": 0.1}, needs_ref=True, inputs=LOGPROB_PAIR, pair_loss=_dpo_loss),
    Objective("rmu", "mean_{t, units} (h_ℓ,t − c·u)²", "Li et al., ICML 2024, WMDP/RMU",
              {"layer": -1.0, "coeff": 6.5}, inputs=HIDDEN, hidden_target=_steering_target,
              trains=STEERED_MLPS),
]}

# Retain terms of a training step, one vocabulary for the loop, the profiler and the command line
# ("none": no retain term); each an entry read through `objective_inputs` like the objectives above.
RETAIN_TERMS = {o.name: o for o in [
    OBJECTIVES["nll"],
    Objective("kl", "mean_t KL(p_ref,t ‖ p_θ,t)", "the retain term of KL-regularized unlearning (TOFU)",
              inputs=REFERENCE_DISTRIBUTION, head_loss="kl", needs_reference_model=True),
    Objective("rr", "mean_{t, units} (h_ℓ,t − h_ℓ,ref,t)²", f"representation retention; {_G_EFFECT}",
              {"layer": -1.0}, inputs=HIDDEN, hidden_target=_reference_target, needs_reference_model=True),
]}
RETAIN_OBJECTIVES = (*RETAIN_TERMS, "none")


_WEIGHT_HPARAMS = ("alpha", "beta", "gamma", "eps")  # what the token-weight formulas (and kernels) read


@dataclass(frozen=True)
class TokenWeighting:
    """A token-level objective's detached weights w_t with its hyper-parameters, as the backends read them:
    `weights` in torch, ``code`` and the numbers in the kernels."""

    objective: Objective
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    eps: float = 0.0

    @property
    def code(self) -> int | None:
        """The kernels' formula (`KernelWeight`, as an int); None: none, the weights are taken in torch."""
        code = self.objective.kernel_code
        return None if code is None else int(code)

    @property
    def needs_ref(self) -> bool:
        return self.objective.needs_ref

    def weights(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        ref = None if ref_logprobs is None else ref_logprobs.detach()
        hp = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "eps": self.eps}
        return self.objective.token_weight(logprobs.detach(), ref, hp)


@dataclass(frozen=True)
class Resolved:
    """An objective with its hyper-parameters checked and defaults filled in (`resolve`)."""

    objective: Objective
    hparams: dict

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def weighting(self) -> TokenWeighting:
        return TokenWeighting(self.objective, **{k: float(v) for k, v in self.hparams.items() if k in _WEIGHT_HPARAMS})


def resolve(name, hparams) -> Resolved:
    """Objective ``name`` with ``hparams`` checked and defaults filled in; ValueError when anything is wrong."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[name]
    unknown = set(hparams) - set(objective.defaults)
    if unknown:
        valid = ", ".join(objective.defaults) or "none"
        raise ValueError(f"objective {name!r} takes no hyper-parameter {', '.join(sorted(unknown))}; "
                         f"valid: {valid}")
    return Resolved(objective, check_hparams({**objective.defaults, **hparams}))
