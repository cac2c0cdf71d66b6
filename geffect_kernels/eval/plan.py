"""What ``geffect train --eval`` scores, decided before any model loads: the sets (forget, utility, holdout, a MUSE
corpus), how many items of each (``--eval-size``, TOFU's ``ds_size``: the first N), and the retain model's reference
(``--retain-model`` evaluated here, or ``--retain-eval`` read from a file)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..data import load_qa
from ..model_mode import eval_mode
from .muse import MuseData, evaluate_muse, load_muse, privleak_scores
from .retain_reference import RetainReference, from_per_sample, read_retain_reference
from .tofu import evaluate_model, score_memorization, score_set


@dataclass(frozen=True)
class EvalPlan:
    forget: list
    retain: list | None = None  # the utility set: --retain-eval-set, else the training retain file
    real_authors: list | None = None
    world: list | None = None
    holdout: list | None = None
    size: int | None = None
    max_new_tokens: int | None = None
    retain_model: str | None = None  # a model folder to evaluate on the same forget (and holdout) set
    reference: RetainReference | None = None
    muse: MuseData | None = None

    @classmethod
    def from_files(cls, forget, retain=None, *, retain_eval_set=None, real_authors=None, world=None, holdout=None,
                   size=None, max_new_tokens=None, retain_model=None, retain_eval=None, muse=None) -> EvalPlan:
        """Pairs already loaded (``forget``, ``retain``) and file paths for the rest; ValueError on bad input."""
        if size is not None and size < 1:
            raise ValueError(f"--eval-size must be a positive integer, got {size}")
        if retain_model and retain_eval:
            raise ValueError("give the retain model either as --retain-model DIR or as --retain-eval FILE, not both")
        first = (lambda pairs: pairs if pairs is None or size is None else pairs[:size])
        reference = read_retain_reference(retain_eval).for_forget_set(len(forget), size) if retain_eval else None
        utility = load_qa(retain_eval_set) if retain_eval_set else retain
        return cls(first(forget), first(utility), first(load_qa(real_authors) if real_authors else None),
                   first(load_qa(world) if world else None), first(load_qa(holdout) if holdout else None), size,
                   max_new_tokens, str(retain_model) if retain_model else None, reference,
                   load_muse(muse) if muse else None)

    def _kwargs(self):
        return {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}

    def with_retain_model(self, model, tokenizer, source) -> tuple[EvalPlan, dict]:
        """Score the retain model on the forget set (truth ratios, membership) and the holdout set; returns the plan
        with that reference and the per-sample scores (to save and reuse with ``--retain-eval``)."""
        vocabulary = model.get_input_embeddings().num_embeddings
        if vocabulary < len(tokenizer):  # its embedding would be indexed past its end
            raise ValueError(f"--retain-model {source}: its vocabulary has {vocabulary} tokens, the tokenizer "
                             f"{len(tokenizer)}: the retain model must use the tokenizer of the model unlearned")
        with eval_mode(model):
            per_sample = {"forget": score_set(model, tokenizer, self.forget, generate=False, memorization=True)}
            if self.holdout:
                per_sample["holdout"] = score_memorization(model, tokenizer, self.holdout)
            if self.muse:
                muse = privleak_scores(model, tokenizer, self.muse, size=self.size)
                if muse:
                    per_sample["muse_privleak"] = muse
        return replace(self, reference=from_per_sample(per_sample, f"retain model {source}")), per_sample

    def evaluate(self, model, tokenizer):
        """``(summary, per_sample)`` of ``model`` on the planned sets, against the reference where there is one."""
        summary, per_sample = evaluate_model(model, tokenizer, self.forget, self.retain, self.world,
                                             real_authors=self.real_authors, holdout=self.holdout,
                                             **(self.reference.as_kwargs() if self.reference else {}),
                                             **self._kwargs())
        if self.muse:
            summary["muse"], per_sample["muse"] = evaluate_muse(
                model, tokenizer, self.muse, size=self.size,
                retain_model_mia_auc=self.reference.muse_mia_auc if self.reference else None)
        if self.reference:
            summary["retain_reference"] = self.reference.source
        return summary, per_sample


__all__ = ["EvalPlan"]
