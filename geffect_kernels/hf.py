"""Hugging Face causal LMs without their logits path: final hidden states plus the LM head.

    inputs = hf.head_inputs(model, batch)              # hidden [B, T, H], weight, bias, softcap, labels
    loss = hf.unlearning_loss("npo", model, batch, ref_logprobs=hf.token_logprobs(ref_model, batch))

Batches are Hugging Face style (``input_ids``, optional ``attention_mask`` and ``labels``; labels
default to the input ids with padding ignored) and labels are shifted the Hugging Face way.

A peft LoRA adapter on the LM head is applied through concatenated inputs (`LMHead.adapted`): the hidden states
gain the adapter's r columns and the weight its B, so every fused loss runs unchanged and no logits are formed.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from .catalog import IGNORE_INDEX
from .inputs import check_labels
from .logprobs import token_logprobs as _token_logprobs
from .objectives import unlearning_loss as _unlearning_loss
from .token_distribution import TokenStats
from .token_distribution import token_stats as _token_stats

# Config fields that change the logits beyond W h + b and soft-capping; we refuse rather than guess.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


class HeadAdapter(NamedTuple):
    """One active peft LoRA adapter on the LM head: it adds ``scale · B A dropout(h)`` to the logits."""
    lora_a: torch.nn.Module  # called as a module, so that hooks (the profiler's capture) see it
    dropout: torch.nn.Module
    weight_b: torch.Tensor  # [V, r]
    scale: float


class LMHead(NamedTuple):
    weight: torch.Tensor  # [V, H]: the base weight (without any adapter)
    bias: torch.Tensor | None
    softcap: float | None
    adapters: tuple = ()  # `HeadAdapter`s of a LoRA-adapted head, applied by `adapted`

    def adapted(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, weight) whose product is the adapted head's logits before bias and cap:
        [h, s·A drop(h)] · [W, B]ᵀ = h Wᵀ + s (A drop(h))ᵀ Bᵀ, so that the fused kernels run unchanged and
        autograd takes the gradients of A, B and h through the concatenation. It copies W (V × (H + r)) and
        forms no N × V logits. Without adapters: ``(hidden, weight)`` as they are."""
        if not self.adapters:
            return hidden, self.weight
        return (torch.cat([hidden, *(a.scale * a.lora_a(a.dropout(hidden.to(a.lora_a.weight.dtype))).to(hidden.dtype)
                                     for a in self.adapters)], dim=-1),
                self.adapted_weight())

    def adapter_columns(self, weight_b) -> slice:
        """The columns of `adapted_weight` that hold the adapter whose B is ``weight_b``."""
        start = self.weight.shape[1]
        for a in self.adapters:
            if a.weight_b is weight_b:
                return slice(start, start + a.weight_b.shape[1])
            start += a.weight_b.shape[1]
        raise ValueError("not an adapter of this head")

    def adapted_weight(self) -> torch.Tensor:
        """[W, B₁, B₂, ...]: ``[V, H + Σ r]`` (the base weight alone without adapters)."""
        if not self.adapters:
            return self.weight
        return torch.cat([self.weight, *(a.weight_b.to(self.weight.dtype) for a in self.adapters)], dim=1)


class HeadInputs(NamedTuple):
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    labels: torch.Tensor

    def as_kwargs(self):
        """Keyword arguments for the loss functions (``shift=True``: HF labels)."""
        return dict(bias=self.bias, softcap=self.softcap, shift=True)


def causal_lm(model):
    """The Hugging Face causal LM of ``model``: itself, or the one a ``peft.PeftModel`` wraps.

    Adapters that live inside the layers (LoRA, IA³, ...) are part of that model's modules, so its decoder
    runs them; prompt-learning adapters add virtual tokens in the wrapper's forward and are refused.
    """
    if not (hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise NotImplementedError(f"{type(config).__name__} adds virtual tokens outside the layers; "
                                  "only adapters inside the layers (LoRA, IA3, ...) are supported")
    return model.get_base_model()


def lm_head(model) -> LMHead:
    """The output projection of ``model``: weight (the tied input embedding when tied), bias, soft-cap."""
    model = causal_lm(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (is it a causal LM?)")
    adapters = ()
    if hasattr(head, "base_layer"):  # a peft adapter layer: its weight is the base's, without the adapter
        head, adapters = head.get_base_layer(), _head_adapters(head)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(text_config, field, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(model).__name__} scales its logits ({field}={value}); "
                                      f"not supported yet")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None, adapters)


def _head_adapters(layer) -> tuple:
    """The active LoRA adapters of a peft layer on the head, as its forward applies them (none when they are
    disabled or merged into the base weight). Other adapter kinds, DoRA and LoRA biases are refused."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer) or not isinstance(layer.get_base_layer(), torch.nn.Linear):
        raise NotImplementedError(f"an adapter on the LM head is supported for LoRA on a linear head, not "
                                  f"{type(layer).__name__}; adapt the decoder's layers, or train the head itself "
                                  f"(peft modules_to_save)")
    if layer.disable_adapters:
        if layer.merged:  # what the layer's own forward does
            layer.unmerge()
        return ()
    if layer.merged:
        return ()
    adapters = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
            raise NotImplementedError(f"the LM head's adapter {name!r} is a LoRA variant (DoRA, ...); only plain "
                                      f"LoRA is supported on the head")
        if layer.lora_B[name].bias is not None:
            raise NotImplementedError(f"the LM head's adapter {name!r} has a bias (lora_bias); not supported")
        adapters.append(HeadAdapter(layer.lora_A[name], layer.lora_dropout[name], layer.lora_B[name].weight,
                                    float(layer.scaling[name])))
    return tuple(adapters)


def final_hidden_states(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    """The decoder's last hidden states (after the final norm), ``[B, T, H]``, without the LM head.

    A model sharded with FSDP2 (``fully_shard``) is run through its root's forward, which gathers the
    root's parameters (embedding, final norm, head) and reduce-scatters their gradients; the head then
    scores the last position only, and the hidden states are read off the decoder's output.
    """
    lm = causal_lm(model)
    base = getattr(lm, "base_model", None)
    if base is None or base is lm:
        raise ValueError(f"{type(lm).__name__} does not expose a base model under its LM head")
    root = _fsdp_root(model)
    if root is None:
        out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    seen = []
    handle = base.register_forward_hook(
        lambda module, args, out: seen.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
    try:
        root(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    return seen[-1]


def _fsdp_root(model):
    """The outermost FSDP2-sharded module of ``model`` (itself or its causal LM), or None when not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    for candidate in (model, causal_lm(model)):
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


def batch_labels(batch) -> torch.Tensor:
    """``batch["labels"]``, or the input ids with padded positions set to `IGNORE_INDEX`."""
    if "labels" in batch and batch["labels"] is not None:
        return batch["labels"]
    labels = batch["input_ids"].clone()
    if batch.get("attention_mask") is not None:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def check_batch(name, batch, vocab_size) -> None:
    """ValueError naming ``name`` unless ``batch`` is a batch the head can score: integer ``input_ids``
    ``[B, T]`` with B ≥ 1 and T ≥ 2 (a next token to predict), ``attention_mask`` and ``labels`` shaped
    alike, labels in ``[0, vocab_size)`` or `IGNORE_INDEX`."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a dict with an input_ids tensor (optionally attention_mask, labels)")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name}: input_ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{name}: input_ids is [B, T] = {tuple(ids.shape)}, no next token to score "
                         f"(B ≥ 1 and T ≥ 2 needed)")
    for key in ("attention_mask", "labels"):
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
            raise ValueError(f"{name}: {key} must be a tensor shaped like input_ids {tuple(ids.shape)}")
    try:
        check_labels(batch_labels(batch), vocab_size, IGNORE_INDEX)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def head_inputs(model, batch) -> HeadInputs:
    """Run the decoder on ``batch`` and return everything the loss functions need."""
    if "input_ids" not in batch:
        raise ValueError("batch needs input_ids")
    hidden = final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"))
    head = lm_head(model)
    if head.adapters and _fsdp_root(model) is not None:
        raise NotImplementedError("a LoRA adapter on the LM head of an FSDP2-sharded model is not supported: adapt "
                                  "the decoder's layers, or train in one process")
    hidden, weight = head.adapted(hidden)  # a LoRA adapter on the head: concatenated inputs
    return HeadInputs(hidden, weight, head.bias, head.softcap, batch_labels(batch))


def token_logprobs(model, batch, *, backend="auto") -> torch.Tensor:
    """ℓ_t of ``model`` on ``batch``: ``[B, T-1]`` (HF shift), 0 at ignored positions."""
    x = head_inputs(model, batch)
    return _token_logprobs(x.hidden, x.weight, x.labels, **x.as_kwargs(), backend=backend)


def token_stats(model, batch, *, backend="auto") -> TokenStats:
    """ℓ_t, entropy and Var_p[log p] of ``model`` on ``batch`` (`geffect_kernels.token_stats`), each ``[B, T-1]``
    (HF shift), 0 at ignored positions; the decoder runs without autograd."""
    with torch.no_grad():
        x = head_inputs(model, batch)
        return _token_stats(x.hidden, x.weight, x.labels, **x.as_kwargs(), backend=backend)


def unlearning_loss(name, model, batch, *, ref_logprobs=None, backend="auto", **hparams) -> torch.Tensor:
    """Objective ``name`` on ``model`` and ``batch``; ``ref_logprobs`` from `token_logprobs` of the reference."""
    x = head_inputs(model, batch)
    return _unlearning_loss(name, x.hidden, x.weight, x.labels, ref_logprobs=ref_logprobs, **x.as_kwargs(),
                            backend=backend, **hparams)


def __getattr__(name):
    # the Trainer needs transformers and accelerate (the hf extra): imported only when asked for
    if name == "UnlearningTrainer":
        from .hf_trainer import UnlearningTrainer
        return UnlearningTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
