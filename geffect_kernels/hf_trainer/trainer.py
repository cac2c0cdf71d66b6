"""`UnlearningTrainer`: a ``transformers.Trainer`` that unlearns a forget set while keeping a retain set.

    trainer = UnlearningTrainer(model=model, args=TrainingArguments(...), forget_dataset=forget,
                                retain_dataset=retain, objective="npo", retain_objective="nll", hparams={"beta": 0.1})
    trainer.train()

Each step's loss is ``forget_weight · L_objective(forget batch) + retain_weight · L_retain(retain batch)`` on the fused
LM head (the model's logits are never formed). The training set is the forget set, each example paired with a
seeded random retain example (`pairs`); the reference log-probabilities are computed once, before the first update
(`reference`). Everything else is the Trainer's: gradient accumulation (a micro-batch's loss is its mean, as
Trainer and open-unlearning average them), DDP under torchrun, mixed precision, checkpoints and
``resume_from_checkpoint`` (this class adds the reference and the G-effect history to each checkpoint), logging
through ``report_to``.
"""
from __future__ import annotations

import math
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..backends.registry import check_backend
from ..data.prompts import padding_id
from ..guidance import GUIDANCES, TEMPERATURE
from ..layers import layer_index
from .collator import PairCollator
from .instance_callback import InstanceWeightingCallback
from .pairs import ForgetRetainPairs, tokenized_examples
from .rectify_callback import RectifyCallback
from .reference import StartingModel, checked_logprobs, starting_logprobs
from .step_geffects import StepGEffects
from .stop_callback import StopWhenCallback
from .terms import objective_term, retain_term
from .wrapped_forward import run_as_forward

STATE_FILE = "unlearning_state.pt"  # in each checkpoint folder: what resuming needs besides the Trainer's files
_OWN_ARGUMENTS = ("train_dataset", "data_collator")


class UnlearningTrainer(Trainer):
    """A Trainer over forget-retain pairs with one of the package's objectives.

    Args beyond the Trainer's (``model``, ``args``, ``processing_class``, ``callbacks``, ... pass through):
        forget_dataset, retain_dataset: lists or ``datasets``-style sequences of tokenized examples (``input_ids``,
            ``labels``) or of TOFU-format records (``question``, ``answer``; then pass the tokenizer as
            ``processing_class``). ``retain_dataset`` may be None with ``retain_objective="none"``.
        objective, hparams: an unlearning objective of the catalog and its hyper-parameters.
        retain_objective: a retain term of the catalog (``catalog.RETAIN_TERMS``: "nll", "kl", "rr") or "none".
        alternates: substitute answers for the forget questions (PO, DPO): one per record, or a file of them.
        forget_weight, retain_weight: the terms' weights.
        ref_logprobs: the reference log-probabilities of each forget example (one 1-D sequence each, HF shift),
            in place of the starting model's.
        geffect_every: measure G-effects every this many updates (0: never); they are logged as ``e_forget`` and
            ``e_retain`` (``state.log_history``, ``report_to``) and kept in ``self.geffects``.
        stop_when: stop rules on those G-effects (``--stop-when``'s, `guidance.stop`), a `StopWhenCallback`.
        guidance: "rectify" (`RectifyCallback`) or "instance" (`InstanceWeightingCallback`, with
            ``guidance_temperature``), one process; or None.
        primal_dual, dual_step: PDU: the retain weight becomes a dual variable for retain loss ≤ ``primal_dual``.
        backend: the kernels' backend ("auto").
        max_length: the longest encoded TOFU-format example.
    """

    def __init__(self, model=None, args=None, *, forget_dataset=None, retain_dataset=None, objective="npo",
                 retain_objective="nll", hparams=None, forget_weight=1.0, retain_weight=1.0, ref_logprobs=None,
                 geffect_every=0, geffect_groups="layer", stop_when=None, guidance=None, primal_dual=None,
                 dual_step=1.0, alternates=None, guidance_temperature=TEMPERATURE, backend="auto", max_length=None,
                 **kwargs):
        for name in _OWN_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: UnlearningTrainer builds it from forget_dataset and retain_dataset")
            kwargs.pop(name, None)
        if guidance not in (None, *GUIDANCES):
            raise ValueError(f"guidance: unknown {guidance!r}; valid: {', '.join(GUIDANCES)} (or None)")
        self.forget_term = objective_term(objective, hparams or {})
        self.retain_term = retain_term(retain_objective, self.forget_term)
        for name, value in (("forget_weight", forget_weight), ("retain_weight", retain_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        for name, value in (("primal_dual", primal_dual), ("dual_step", dual_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if primal_dual is not None and self.retain_term is None:
            raise ValueError("primal_dual: the constraint is on the retain loss; set a retain_objective")
        if isinstance(geffect_every, bool) or not isinstance(geffect_every, int) or geffect_every < 0:
            raise ValueError(f"geffect_every must be an integer ≥ 0, got {geffect_every!r}")
        if stop_when and not geffect_every:
            raise ValueError("stop_when: its rules read the G-effects; set geffect_every > 0")
        tokenizer = kwargs.get("processing_class")
        forget = tokenized_examples("forget_dataset", forget_dataset, tokenizer, max_length=max_length,
                                    alternates=alternates)
        if self.forget_term.reads_alternate and not all("alternate" in e for e in forget):
            raise ValueError(f"forget_dataset: objective {objective!r} reads a substitute answer for each forget "
                             f"question: give records an 'alternate' answer (or alternates=, e.g. TOFU's "
                             f"idontknow.jsonl), tokenized examples alternate_input_ids/alternate_labels")
        retain = None
        if self.retain_term is not None:
            if retain_dataset is None:
                raise ValueError(f"retain_dataset: retain_objective {retain_objective!r} needs one "
                                 f"(or retain_objective='none')")
            retain = tokenized_examples("retain_dataset", retain_dataset, tokenizer, max_length=max_length)
        self.given_logprobs = None if ref_logprobs is None else checked_logprobs(ref_logprobs, forget)
        self.objective, self.hparams, self.retain_objective = objective, dict(hparams or {}), retain_objective
        self.forget_weight, self.retain_weight, self.backend = float(forget_weight), float(retain_weight), backend
        # PDU (open-unlearning's pdu.py): the retain weight is a dual variable λ for the constraint retain loss ≤ ε,
        # starting at retain_weight, raised by dual_step · (the update's retain loss − ε) after each update
        self.primal_dual, self.dual_step = primal_dual, float(dual_step)
        self.dual = self.retain_weight if primal_dual is not None else None
        self.step_dual = self.dual
        self._update_retain = None  # the retain loss's sum and count over the current update's micro-batches
        self.forget_examples = forget
        pad = padding_id(tokenizer) if tokenizer is not None else None
        self.pad_id = pad if pad is not None else (getattr(getattr(model, "config", None), "pad_token_id", None) or 0)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if stop_when:
            callbacks.append(StopWhenCallback(stop_when))
        if guidance == "rectify":
            callbacks.append(RectifyCallback())
        if guidance == "instance":
            callbacks.append(InstanceWeightingCallback(guidance_temperature))
        self.rectify = next((c for c in callbacks if isinstance(c, RectifyCallback)), None)
        self.instance = next((c for c in callbacks if isinstance(c, InstanceWeightingCallback)), None)
        if self.rectify is not None and self.retain_term is None:
            raise ValueError("guidance: rectify steers the objective by the retain term's gradient; set a "
                             "retain_objective")
        if self.instance is not None:
            self._check_instance_weighting(retain_objective, primal_dual)
        super().__init__(model=model, args=args, train_dataset=None, data_collator=PairCollator(self.pad_id),
                         callbacks=callbacks, **kwargs)
        self.train_dataset = ForgetRetainPairs(forget, retain, seed=self._pairing_seed())
        check_backend(backend, next(self.model.parameters()).device)
        self._check_entries()
        if (self.rectify is not None or self.instance is not None) and self.args.world_size > 1:
            raise ValueError("guidance: runs in one process (under DDP each term's gradient would be all-reduced "
                             "apart); use geffect train --nproc for several")
        self.model_accepts_loss_kwargs = False  # each micro-batch's loss is its mean: the Trainer averages them
        self.geffects = None
        self.step_geffects = (StepGEffects(objective, self.hparams, self._profiled_retain(),
                                           every=geffect_every, groups=geffect_groups) if geffect_every else None)
        self.reference = None  # made at the start of train(), from the starting model
        self._term_sums = None
        self._objective_grads = None  # rectify: the objective term's gradient over the update's micro-batches
        self.add_callback(_EpochPairing(self))
        self.add_callback(_DualAscent(self))

    # -- setup ------------------------------------------------------------------------------------------------

    def _profiled_retain(self):
        return None if self.retain_term is None else self.retain_objective

    def _check_instance_weighting(self, retain_objective, primal_dual):
        """Instance weighting's conditions (the loop's): per-sample G-effects of an objective of the forget answers'
        log-probabilities, against the NLL retain term's gradient, at a fixed retain weight."""
        if not self.forget_term.entry.objective.on_forget_logprobs:
            raise ValueError(f"guidance: instance weighting needs an objective of the forget answers' "
                             f"log-probabilities, not {self.forget_term.entry.name!r}")
        if retain_objective != "nll" or self.retain_weight == 0:
            raise ValueError("guidance: instance weighting needs the nll retain term with retain_weight > 0 (the "
                             "retain risk's gradient)")
        if primal_dual is not None:
            raise ValueError("guidance: instance weighting takes a fixed retain_weight, not primal_dual")

    def _check_entries(self):
        """What the entries read of the model, checked now: the layer (RMU, RR); the parameters RMU trains, the
        others then frozen (before the optimizer is made)."""
        try:
            for term in (self.forget_term, self.retain_term):
                if term is not None and term.entry.objective.level == "hidden":
                    layer_index(self.model, term.entry.hparams.get("layer", -1.0))
            only = self.forget_term.trained_parameters(self.model)
        except ValueError as err:
            raise ValueError(f"objective/hparams: {err}") from None
        if only is not None:
            for name, p in self.model.named_parameters():
                if name not in only:
                    p.requires_grad_(False)

    def _pairing_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _make_reference(self, saved: dict | None):
        """The starting model's reference, from a checkpoint's saved state, the user's values, or the model now
        (before the Trainer loads a checkpoint's weights into it)."""
        terms = [t for t in (self.forget_term, self.retain_term) if t is not None]
        saved = saved or {}

        def rows_of(key, examples, given=None):
            if saved.get(key) is not None:
                return saved[key]
            if given is not None:
                return given
            return starting_logprobs(self.model, examples, pad_id=self.pad_id,
                                     batch_size=self.args.per_device_train_batch_size, backend=self.backend)

        rows = alternate_rows = None
        if any(t.needs_logprobs for t in terms):
            rows = rows_of("ref_rows", self.forget_examples, self.given_logprobs)
        if any(t.needs_alternate_logprobs for t in terms):
            alternate_rows = rows_of("alternate_rows", [e["alternate"] for e in self.forget_examples])
        return StartingModel(self.model, rows, alternate_rows, whole_model=any(t.needs_model for t in terms),
                             seed=self.args.seed)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint: no checkpoint in output_dir {self.args.output_dir}")
        saved = None
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {STATE_FILE} "
                                 f"(not written by UnlearningTrainer)")
            saved = torch.load(path, map_location="cpu", weights_only=True)
        if self.reference is None or saved is not None:
            self.reference = self._make_reference(saved)
        if self.dual is not None and saved is not None and saved.get("dual") is not None:
            self.dual = float(saved["dual"])
        if self.step_geffects is not None and saved is not None and saved.get("geffects") is not None:
            from ..geffect import GEffectHistory
            self.step_geffects.history = GEffectHistory.from_dict(saved["geffects"])
        self.geffects = None if self.step_geffects is None else self.step_geffects.history
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # -- the data ---------------------------------------------------------------------------------------------

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        # the pairs' fields are the loss's, whatever model.forward's signature says
        return data_collator if description == "Training" else super()._get_collator_with_removed_columns(
            data_collator, description)

    # -- one step ---------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The update's micro-batches; first its G-effects (when due), and none when a stop rule then fired (the
        update is skipped: the model stays after the updates before it)."""
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.step_geffects is not None and batches and self.step_geffects.due(self.state.global_step):
            values = self.step_geffects.measure(self.model, self._prepare_inputs(batches[0]), self.reference,
                                                self.state.global_step)
            self.log(values)
            if self.control.should_training_stop:
                return [], None
        if self.instance is not None and batches:
            prepared = [self._prepare_inputs(batch) for batch in batches]
            self.model.train()
            sums = self.instance.guided_gradients(self, prepared)
            self._guided_losses = sums
            for _ in batches:  # the log's means count micro-batches
                self._add_terms({"forget_loss": torch.tensor(sums["forget_loss"]),
                                 "retain_loss": torch.tensor(sums["retain_loss"])})
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "forget" not in inputs:  # evaluation on plain examples: the model's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        terms = {"forget_loss": self._term_loss(model, self.forget_term, inputs["forget"])}
        loss = self.forget_weight * terms["forget_loss"]
        if self.retain_term is not None:
            terms["retain_loss"] = self._term_loss(model, self.retain_term, _batch(inputs["retain"]))
            loss = loss + self._retain_part(terms["retain_loss"])
        self._add_terms(terms)
        return (loss, terms) if return_outputs else loss

    def _term_loss(self, model, term, batch):
        """``term``'s loss on ``batch``, run as ``model``'s forward (DDP's gradient sync), under the run's
        autocast."""
        module = self.accelerator.unwrap_model(model)

        def forward():
            with self.accelerator.autocast():
                return term.loss(module, batch, self.reference, self.backend)

        return run_as_forward(model, module, forward)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; with rectify guidance the two terms' backward apart, the objective's gradient held
        aside until the update's last micro-batch (`RectifyCallback.combine`)."""
        if self.instance is not None and "forget" in inputs:  # the update's gradient is already in .grad
            scale = 1.0 / self.current_gradient_accumulation_steps
            return torch.tensor(scale * self._guided_losses["loss"], device=self.args.device)
        if self.rectify is None or "forget" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        retain_grads = {n: p.grad for n, p in params.items()}
        for p in params.values():
            p.grad = None
        with self.compute_loss_context_manager():
            forget_loss = self._term_loss(model, self.forget_term, inputs["forget"])
        self.accelerator.backward(self.forget_weight * scale * forget_loss)
        held = self._objective_grads or {}
        self._objective_grads = {n: held.get(n, 0) + (p.grad if p.grad is not None else torch.zeros_like(p))
                                 for n, p in params.items()}
        for name, p in params.items():
            p.grad = retain_grads[name]
        with self.compute_loss_context_manager():
            retain_loss = self._term_loss(model, self.retain_term, _batch(inputs["retain"]))
        self.accelerator.backward(scale * self._retain_part(retain_loss))
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.accelerator.sync_gradients:  # the update's last micro-batch
            self.rectify.combine(self.model, {n: g.detach() for n, g in self._objective_grads.items()})
            self._objective_grads = None
        self._add_terms({"forget_loss": forget_loss, "retain_loss": retain_loss})
        return (scale * (self.forget_weight * forget_loss + self._retain_part(retain_loss))).detach()

    def _retain_part(self, retain_loss):
        """The retain term in the step's loss: retain_weight · L, or with PDU λ · (L − ε)."""
        if self.dual is None:
            return self.retain_weight * retain_loss
        return self.dual * (retain_loss - self.primal_dual)

    def _dual_ascent(self):
        """PDU after an update: λ ← max(0, λ + dual_step · (the update's mean retain loss − ε)), over every rank."""
        if self.dual is None or self._update_retain is None:
            return
        sums = self._update_retain
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        self.step_dual = self.dual
        self.dual = max(0.0, self.dual + self.dual_step * (float(sums[0] / sums[1]) - self.primal_dual))
        self._update_retain = None

    def floating_point_ops(self, inputs):
        if "forget" not in inputs:
            return super().floating_point_ops(inputs)
        return sum(super(UnlearningTrainer, self).floating_point_ops(_batch(inputs[side]))
                   for side in ("forget", "retain") if side in inputs)

    # -- logging and checkpoints ------------------------------------------------------------------------------

    def _add_terms(self, terms):
        values = torch.stack([terms["forget_loss"].detach().float(),
                              terms.get("retain_loss", torch.zeros(())).detach().float().to(
                                  terms["forget_loss"].device), torch.ones((), device=terms["forget_loss"].device)])
        self._term_sums = values if self._term_sums is None else self._term_sums + values
        if self.dual is not None:
            part = values[1:]
            self._update_retain = part if self._update_retain is None else self._update_retain + part

    def log(self, logs, start_time=None):
        """The Trainer's log; with its training loss, the mean forget and retain terms since the last one (over
        the micro-batches of every rank)."""
        if "loss" in logs and self._term_sums is not None:
            sums = self._term_sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs = {**logs, "forget_loss": float(sums[0] / sums[2])}
            if self.retain_term is not None:
                logs["retain_loss"] = float(sums[1] / sums[2])
            if self.rectify is not None:
                logs["rectified_groups"] = self.rectify.rectified_groups
            if self.instance is not None:
                logs["weight_min"], logs["weight_max"] = self.instance.weight_min, self.instance.weight_max
            if self.dual is not None:
                logs["dual"] = self.step_dual  # the λ of the last update (the next one's is `self.dual`)
            self._term_sums = None
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {"ref_rows": None if self.reference is None else self.reference.rows, "dual": self.dual,
                     "alternate_rows": None if self.reference is None else self.reference.alternate_rows,
                     "geffects": None if self.step_geffects is None else self.step_geffects.history.to_dict()}
            torch.save(state, os.path.join(folder, STATE_FILE))


class _EpochPairing(TrainerCallback):
    """Each epoch its own pairs (`ForgetRetainPairs.set_epoch`); on resume the Trainer restores ``state.epoch``
    (mid-epoch: its whole part is the epoch)."""

    def __init__(self, trainer):
        self.pairs = trainer.train_dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.pairs.set_epoch(int(state.epoch or 0))


class _DualAscent(TrainerCallback):
    """PDU's dual step after each update (`UnlearningTrainer._dual_ascent`), before the update's log."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._dual_ascent()


def _batch(batch):
    """The fields a loss reads (the forget side's ``index`` is the reference's)."""
    return {k: v for k, v in batch.items() if k != "index"}
