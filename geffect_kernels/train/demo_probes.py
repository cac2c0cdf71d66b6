"""What the demo measures on a model while it unlearns (the training loop's ``evaluate`` hook).

- `probability_probe`: teacher-forced mean answer probability on the forget and the retain set (the trade-off
  curves and observation (f)).
- `NPOProbe`: per forget instance, NPO's weight 2σ(β(ℓ_seq − ℓ_ref,seq)) and the damage its unweighted gradient
  does to retention (minus its GA retaining G-effect): observations (d) and (e).
- `RetainTermProbe`: the G-effects of the NLL, KL and RR retain terms on the forget and retain NLL at the current
  parameters (the paper's case study, observations (h)–(k)).
"""
from __future__ import annotations

import torch

from .. import hf
from ..eval import mean_answer_logprobs
from ..catalog import OBJECTIVES


def probability_probe(tokenizer, forget, retain):
    """``probe(model) -> {"probe_forget_probability": ..., "probe_retain_probability": ...}`` on QA pairs."""
    def probe(model):
        return {f"probe_{name}_probability": float(mean_answer_logprobs(
                    model, tokenizer, [p.question for p in pairs], [p.answer for p in pairs]).exp().mean())
                for name, pairs in (("forget", forget), ("retain", retain))}
    return probe


class NPOProbe:
    """NPO weights and per-instance retain damage over the whole forget set (``EncodedSet``s), against a fixed
    retain sample; ``reference`` is the model unlearning starts from (NPO's reference)."""

    def __init__(self, reference, forget, retain, *, beta: float, retain_samples: int = 32):
        self.beta = beta
        self.forget = forget.batch(range(len(forget)))
        self.retain = retain.batch(range(min(retain_samples, len(retain))))
        self.ref_seq = self._sequence_logprobs(reference)

    @torch.no_grad()
    def _sequence_logprobs(self, model):
        device = next(model.parameters()).device
        return hf.token_logprobs(model, {k: v.to(device) for k, v in self.forget.items()}).double().sum(-1).cpu()

    def __call__(self, model) -> dict:
        from ..geffect import GEffectProfiler

        weights = OBJECTIVES["npo"].sequence_weight(self._sequence_logprobs(model), self.ref_seq, None,
                                                    {"beta": self.beta})
        device = next(model.parameters()).device
        result = GEffectProfiler(model).measure_unlearning(
            "ga", {k: v.to(device) for k, v in self.forget.items()},
            {k: v.to(device) for k, v in self.retain.items()}, per_instance=True)
        return {"probe_npo_weights": weights.tolist(),
                "probe_instance_damage": [-v for v in result.per_instance["retain"]]}


class RetainTermProbe:
    """Every ``every``-th call (the loop calls it every ``probe_every`` steps), the per-layer G-effects of each retain
    term of `CASE_TERMS` on probe batches, recorded into ``histories`` ({term: GEffectHistory}) at the step reached.
    ``reference``: the starting model, frozen (KL's and RR's); ``layer``: RR's (RMU's, or −1: scaled with depth)."""

    def __init__(self, reference, forget_batch, retain_batch, *, probe_every: int, every: int, layer=None):
        from ..geffect import GEffectHistory
        from ..objective_inputs import ReferenceState

        self.state = ReferenceState(model=reference)
        self.forget_batch, self.retain_batch, self.layer = forget_batch, retain_batch, layer
        self.probe_every, self.every, self.calls = probe_every, every, 0
        self.histories = {term: GEffectHistory(term) for term in CASE_TERMS}

    def __call__(self, model) -> dict:
        from ..geffect import GEffectProfiler

        self.calls += 1
        if self.calls % self.every:
            return {}
        profiler = GEffectProfiler(model, groups="layer")
        for term, history in self.histories.items():
            history.record(self.calls * self.probe_every, profiler.measure_retain_term(
                term, self.forget_batch, self.retain_batch, self.state, layer=self.layer))
        return {}


CASE_TERMS = ("nll", "kl", "rr")  # the retain terms of the paper's case study
