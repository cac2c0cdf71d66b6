"""Presets: every convention and hyper-parameter of a reference implementation behind one switch.

``official`` reproduces how tmlr-group/G-effect (commit ef368ee) runs its unlearning scripts; each value and the
file it comes from is in docs/conventions.md. A preset fills the `TrainConfig` settings left at their defaults
(a value given that differs from the default wins); the ones that depend on the data and the model (steps from
epochs, warm-up, the learning rate of the model's family) are fixed by `resolve` when training starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    settings: dict  # TrainConfig fields
    hparams: dict  # {objective: {hyper-parameter: value}}
    epochs: int  # passes over the forget set (sets ``steps``)
    warmup_epochs: int  # linear warm-up length in passes (sets ``warmup_steps``)
    lr_by_family: dict  # {HF config.model_type: learning rate}


PRESETS = {
    "official": Preset(
        # config/forget.yaml (batch 4 × accumulation 4, weight decay 0, seed 42); forget2.py (max_grad_norm None);
        # basher1.py (save_steps 5); dataloader.py (`*_kl` losses: KL retain term, weight 1, batchmean)
        settings={"batch_size": 4, "grad_accum": 4, "weight_decay": 0.0, "seed": 42, "max_grad_norm": None,
                  "checkpoint_every": 5, "retain_objective": "kl", "retain_weight": 1.0,
                  "kl_normalization": "batchmean"},
        # dataloader.py: the values used when --hyper is not given
        hparams={"npo": {"beta": 0.5}, "wga": {"alpha": 5.0}, "tnpo": {"beta": 4.0, "eps": 1e-5},
                 "wtnpo": {"alpha": 1.5, "beta": 4.0, "eps": 1e-5}},
        epochs=5,  # basher1.py
        warmup_epochs=1,  # forget2.py: warmup_steps = max(1, steps_per_epoch)
        lr_by_family={"phi": 2e-5, "llama": 1e-5},  # basher1.py (Phi-1.5, Llama-2-7B)
    ),
}


def check_preset(name) -> None:
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")


def fill_settings(config) -> None:
    """Give the settings of ``config`` that its caller did not give the preset's values (in place;
    hyper-parameters given win over the preset's, key by key)."""
    if config.preset is None:
        return
    preset = PRESETS[config.preset]
    for key, value in preset.settings.items():
        if key not in config.given:
            setattr(config, key, value)
    config.hparams = {**preset.hparams.get(config.objective, {}), **config.hparams}


def resolve(config, model, n_forget: int):
    """The config with the preset's data- and model-dependent settings fixed: ``steps`` (epochs over
    ``n_forget`` samples, as the official ``max_steps``), ``warmup_steps`` and the learning rate of the model's
    family (a family the preset does not know keeps the learning rate). Settings the caller gave stay."""
    if config.preset is None:
        return config
    preset = PRESETS[config.preset]
    per_step = config.batch_size * config.grad_accum
    changes = {}
    if "steps" not in config.given:
        changes["steps"] = max(1, preset.epochs * n_forget // per_step)
    if "warmup_steps" not in config.given:
        changes["warmup_steps"] = max(1, preset.warmup_epochs * n_forget // per_step)
    family = getattr(getattr(model, "config", None), "model_type", None)
    if "lr" not in config.given and family in preset.lr_by_family:
        changes["lr"] = preset.lr_by_family[family]
    return dataclasses.replace(config, **changes)
