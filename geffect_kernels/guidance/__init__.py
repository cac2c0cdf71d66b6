"""G-effect-guided unlearning: steer a training step with the G-effects the profiler measures online.

- `rectify`: per group of parameters, remove from the forget objective's gradient its component along the retain
  risk's gradient where the two conflict (negative retaining G-effect).
- `instance`: weight forget samples by their retaining G-effects, so that those that raise the retain risk most
  count least (`instance.sample_weights`).
- `stop`: stop rules on the running G-effects (``--stop-when``).
See docs/guidance.md.
"""
from .instance import TEMPERATURE, ForgetGEffects, sample_weights
from .rectify import rectify, rectify_sharded
from .stop import StopRule, parse_stop_when

GUIDANCES = ("rectify", "instance")

__all__ = ["ForgetGEffects", "GUIDANCES", "StopRule", "TEMPERATURE", "parse_stop_when", "rectify", "rectify_sharded",
           "sample_weights"]
