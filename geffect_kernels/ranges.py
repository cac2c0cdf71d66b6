"""The allowed values of every number a user sets, and the one check that enforces them.

Read wherever a number enters: the loss API (hyper-parameters, softcap), `TrainConfig` (which the CLI
and YAML settings go through). NaN and ±inf never pass: an infinite learning rate or β trains a model of
NaN without a word. Each message names the setting, the allowed range and the value given.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple


class Range(NamedTuple):
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # (low, high] instead of [low, high]

    def __str__(self):
        if self.low == -math.inf:
            return "a finite number"
        return f"a finite number {'>' if self.low_open else '≥'} {self.low:g}"


POSITIVE, NON_NEGATIVE, FINITE = Range(0, low_open=True), Range(0), Range()

# the objectives' hyper-parameters (catalog.py): p^α, σ(β·), (1−p)^γ, SimNPO's margin δ, TNPO's ε
# and CE-U's number of leading answer tokens left out per row (an integer)
HPARAMS = {"alpha": NON_NEGATIVE, "beta": POSITIVE, "gamma": NON_NEGATIVE, "delta": FINITE, "eps": NON_NEGATIVE,
           "ignore_first": NON_NEGATIVE,
           # RMU's and RR's layer (−1: scaled with the model's depth, `layers.default_layer`) and steering coefficient c
           "layer": Range(-1), "coeff": NON_NEGATIVE}
INTEGER_HPARAMS = ("ignore_first",)


def check_number(name: str, value, allowed: Range = FINITE) -> float:
    """``value`` as a float when it is a real number in ``allowed``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars pass; str, tensors do not
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    number = float(value)
    inside = number > allowed.low if allowed.low_open else number >= allowed.low
    finite = -math.inf < number < math.inf  # not math.isfinite: torch.compile(dynamic=True) traces floats symbolically
    if not (finite and inside and number <= allowed.high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_hparams(values: dict) -> dict:
    """Every hyper-parameter of ``values`` checked against its range (`HPARAMS`); the integer ones as ints."""
    checked = {key: check_number(f"hyper-parameter {key}", value, HPARAMS.get(key, FINITE))
               for key, value in values.items()}
    for key in INTEGER_HPARAMS:
        if key in checked:
            if not checked[key].is_integer():
                raise ValueError(f"hyper-parameter {key} must be an integer ≥ 0, got {values[key]!r}")
            checked[key] = int(checked[key])
    return checked


def check_label_range(labels, vocab_size: int, ignore_index: int) -> None:
    """ValueError unless every label of the tensor ``labels`` is in ``[0, vocab_size)`` or ``ignore_index`` (reads
    the values: a host-device synchronization for a GPU tensor)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; found {value}")
