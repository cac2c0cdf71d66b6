"""When a run folder's checkpoint is resumed: only under the settings it was trained with, unless the
caller chooses (``resume=True``, ``--resume``: continue under the new settings; ``resume=False``,
``--overwrite``: start over).

The learning rate is a function of the step and the *current* settings (`schedule`), so a run continued
with a larger ``steps`` follows the new schedule from the next step on: the warm-up/decay curve a run of the
new length has at that step (the steps already taken keep the rates they were taken with).
"""
from __future__ import annotations

import hashlib
import json

from ..catalog import resolve

# Settings that change neither the weights nor the logged numbers; every other TrainConfig field does
# (fields added later count as shaping until listed here).
NOT_SHAPING = ("eval_every", "checkpoint_every", "out_dir", "backend", "progress", "gradient_checkpointing",
               "reference_device")


class ResumeMismatch(ValueError):
    """The checkpoint was trained under other settings; the message names them and the choices."""


def run_settings(config, forget, retain) -> dict:
    """What shapes a run: the TrainConfig fields but `NOT_SHAPING` (hyper-parameters with their defaults
    filled in) and fingerprints of the forget and retain data."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_SHAPING}
    settings["hparams"] = resolve(config.objective, config.hparams).hparams
    settings["forget_data"] = fingerprint(forget)
    settings["retain_data"] = fingerprint(retain) if config.uses_retain else None
    return settings


def fingerprint(data) -> str:
    """A short hash of an EncodedSet's token ids, labels and padding id."""
    digest = hashlib.sha256(str(data.pad_id).encode())
    for example in data.examples + (getattr(data, "alternates", None) or []):
        digest.update(json.dumps([list(example["input_ids"]), list(example["labels"])]).encode())
    return digest.hexdigest()[:16]


def differences(old: dict, new: dict) -> dict:
    """``{setting: (old value, new value)}`` for every setting that differs."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def should_resume(where, state: dict | None, settings: dict, resume: bool | None) -> bool:
    """Whether to continue from ``state`` (a checkpoint) under ``settings``; ResumeMismatch when that needs a
    choice the caller did not make (``resume=None``) or cannot be done."""
    if state is None or resume is False:
        return False
    step, changed = state["step"], differences(state["settings"], settings)
    if step > settings["steps"]:
        raise ResumeMismatch(f"{where}: its checkpoint is at step {step}, past steps={settings['steps']}; "
                             f"pass --overwrite (resume=False) to start over, or --steps {step} or more")
    if changed and resume is None:
        listed = "; ".join(f"{k}: changed" if k.endswith("_data") else f"{k}: {a!r} -> {b!r}"
                           for k, (a, b) in changed.items())
        raise ResumeMismatch(f"{where}: its checkpoint (step {step}) was trained with other settings ({listed}); "
                             f"pass --resume (resume=True) to continue it under the new ones (the learning rate "
                             f"follows the new schedule from step {step + 1}) or --overwrite (resume=False) to "
                             f"start over")
    return True


