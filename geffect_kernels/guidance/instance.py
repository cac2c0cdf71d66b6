"""Weight forget samples by their retaining G-effect: those whose gradient raises the retain risk most count least.

For a forget batch of B samples, the objective's gradient is Σ_s g_s, g_s the part sample s's tokens
contribute (∂L/∂ℓ_t ∇ℓ_t summed over the sample's tokens). With r the retain risk's gradient, sample s's
retaining G-effect is e_s = ⟨g_s, r⟩ (negative: a step on that sample raises the retain NLL). The guided step
descends Σ_s w_s g_s with

    z_s = (e_s − mean(e)) / std(e),      w_s = B · exp(z_s / τ) / Σ_k exp(z_k / τ)

(population std over the batch; z = 0 when every e_s is equal). The weights average 1, so w ≡ 1 is the
unguided objective; the temperature τ (default `TEMPERATURE`) sets how hard damaging samples are discounted:
τ → ∞ gives the unguided step, small τ keeps the least damaging samples only. Standardizing makes the weights
independent of the G-effects' scale, which falls by orders of magnitude during unlearning.

The e_s come from the training step's own passes, with no per-sample gradient of the decoder (DESIGN §4): the
decoder runs once with hooks recording each layer's inputs (`geffect.capture`), a pass over the head gives the
log-probabilities and each token's hidden-state cotangent, one backward from the hidden states gives each layer's
output gradients without forming any weight gradient, and each row's share of ⟨g, r⟩ against the dense retain
gradient r (already in ``.grad`` from the retain term's backward) is one projection per layer
(`inner.row_dots`). The weighted gradient is then formed from the same factors with each sample's rows scaled by
w_s, the weight-gradient matmuls a plain backward would have run. The head's gradient is held per sample (B·V·H
numbers, a second pass over the head, when it fits `head.per_sample_fits`; else its rows are projected on r and
its weighted gradient is a third pass).
"""
from __future__ import annotations

import torch

from .. import hf
from ..catalog import IGNORE_INDEX, resolve
from ..geffect import products
from ..geffect.capture import Capture
from ..geffect.head import head_projection_pass, head_rows, per_sample_fits, profiled_head
from ..geffect.inner import SampleScaled, row_dots, sample_dense
from ..objectives import unlearning_loss_from_logprobs
from .rectify import dot

TEMPERATURE = 1.0


def sample_weights(geffects: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """w_s = B·softmax(z/τ) with z the standardized retaining G-effects (float64, mean 1; see the module)."""
    if not temperature > 0:
        raise ValueError(f"the instance temperature must be positive, got {temperature!r}")
    e = geffects.double()
    spread = e.std(unbiased=False) if e.numel() > 1 else e.new_zeros(())
    z = (e - e.mean()) / spread if float(spread) > 0 else torch.zeros_like(e)
    return e.numel() * torch.softmax(z / temperature, 0)


class ForgetGEffects:
    """One forget batch's forward, head pass and unweighted backward: per-sample retaining G-effects against a
    dense retain gradient (`geffects`), then the gradient of any per-sample weighting (`weighted_gradient`).
    ``pool``: a `geffect.buffers.BufferPool` lending the head's V-sized buffers (kept from one step to the next,
    reclaimed by the caller once this object's gradients are used)."""

    def __init__(self, model, params: dict, batch, objective, ref_logprobs=None, hparams=None, pool=None):
        objective = resolve(objective, hparams or {}) if isinstance(objective, str) else objective
        self.params, self.model = params, model
        self.device_types = {p.device.type for p in params.values()}
        capture = Capture(model, params)
        with capture:
            hidden = head_rows(model, batch["input_ids"], batch.get("attention_mask"))  # [h, s·A h] with a head adapter
        head = profiled_head(model, params)
        labels = hf.batch_labels(batch)[:, 1:]
        valid = labels != IGNORE_INDEX
        self.samples = labels.shape[0]
        gram = head_projection_pass(head.weight, head.bias, head.softcap,
                                    {"forget": (hidden[:, :-1].detach(), labels, valid)}, {}, pool=pool,
                                    columns=head.columns)
        logprobs = torch.zeros(labels.numel(), dtype=gram.logprobs["forget"].dtype, device=labels.device)
        logprobs = logprobs.index_copy_(0, gram.rows["forget"], gram.logprobs["forget"]).reshape(labels.shape)
        logprobs.requires_grad_()
        with torch.enable_grad():
            loss = unlearning_loss_from_logprobs(objective, logprobs, labels, ref_logprobs=ref_logprobs)
            coef, = torch.autograd.grad(loss, logprobs)
        self.loss = loss.detach()
        self.coef = torch.where(valid, coef, 0).reshape(-1)
        self.gram = gram
        rows = gram.rows["forget"]
        dh = torch.zeros(labels.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        dh.index_copy_(0, rows, (self.coef[rows].to(gram.direction["forget"].dtype).unsqueeze(1)
                                 * gram.direction["forget"]).to(hidden.dtype))
        dh = torch.cat([dh.reshape(*labels.shape, -1), hidden.new_zeros(labels.shape[0], 1, hidden.shape[-1])], 1)
        self.decoder = capture.gradient(hidden, dh) if hidden.requires_grad else None
        if self.decoder is not None and self.decoder.dense:
            raise ValueError("instance weighting needs every trainable parameter used through Linear, Conv1D, "
                             f"Embedding or affine norm layers; {', '.join(sorted(self.decoder.dense))} are not")
        self.head = {role: name for role, (name, _) in head.params.items()}
        self.head_per_sample = per_sample_fits(self.samples, head.weight.shape[0],
                                               len(range(head.weight.shape[1])[head.columns]))

    def _head_gradient(self, role):
        """The head's gradient per forget sample, ``[B, V, H]`` or ``[B, V]`` (one pass, both parts)."""
        return self.gram.gradient("forget", self.coef, role, self.samples)

    def _per_sample(self, rows_values):
        return rows_values.reshape(self.samples, -1).sum(1)

    def geffects(self, retain_grads: dict) -> torch.Tensor:
        """e_s = ⟨g_s, r⟩ per forget sample (float64 ``[B]``); ``retain_grads``: {name: dense r} (missing: 0)."""
        e = torch.zeros(self.samples, dtype=torch.float64)
        with products.exact_arithmetic(self.device_types):
            for name, uses in (self.decoder.uses.items() if self.decoder is not None else ()):
                r = retain_grads.get(name)
                if r is not None:
                    for use in uses:
                        e += self._per_sample(row_dots(use, r)).cpu()
            for role, name in self.head.items():
                r = retain_grads.get(name)
                if r is None:
                    continue
                dense = r.to(self.gram.hidden["forget"].dtype)
                if self.head_per_sample:
                    grads = self._head_gradient(role)
                    e += torch.stack([dot(grads[s], dense) for s in range(self.samples)]).cpu()
                else:
                    e += self._per_sample(self.gram.rows_against("forget", self.coef, role, dense)).cpu()
        return e

    def weighted_gradient(self, weights: torch.Tensor) -> dict:
        """{name: Σ_s w_s g_s} over the trainable parameters the objective reaches (``weights``: ``[B]``)."""
        out = {}
        w = weights.to(torch.float64)
        with products.exact_arithmetic(self.device_types):
            for name, uses in (self.decoder.uses.items() if self.decoder is not None else ()):
                shape = self.params[name].shape
                for use in uses:
                    part = sample_dense(SampleScaled(use, w.to(self._device(use))).explicit(), 1, shape)[0]
                    out[name] = part if name not in out else out[name] + part
            if self.head and self.head_per_sample:
                for role, name in self.head.items():
                    grads = self._head_gradient(role)
                    part = (grads.reshape(self.samples, -1).t() @ w.to(grads.dtype)).reshape(grads.shape[1:])
                    out[name] = part if name not in out else out[name] + part
            elif self.head:
                per_token = self.coef * w.to(self.coef.device, self.coef.dtype).repeat_interleave(
                    self.coef.numel() // self.samples)
                for role, name in self.head.items():
                    part = self.gram.gradient("forget", per_token, role, 1)[0]
                    out[name] = part if name not in out else out[name] + part
        return {name: g.to(self.params[name].dtype).reshape(self.params[name].shape) for name, g in out.items()}

    @staticmethod
    def _device(use):
        return (use.left if hasattr(use, "left") else use.rows).device
