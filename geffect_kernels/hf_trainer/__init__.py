"""A Hugging Face ``Trainer`` for unlearning (`UnlearningTrainer`), its paired data set and its callbacks; needs
``transformers`` and ``accelerate`` (the ``hf`` extra). Also reachable as ``geffect_kernels.hf.UnlearningTrainer``."""
from .collator import PairCollator
from .instance_callback import InstanceWeightingCallback
from .pairs import ForgetRetainPairs, retain_index, tokenized_examples
from .rectify_callback import RectifyCallback
from .stop_callback import StopWhenCallback
from .trainer import UnlearningTrainer

__all__ = ["ForgetRetainPairs", "InstanceWeightingCallback", "PairCollator", "RectifyCallback", "StopWhenCallback",
           "UnlearningTrainer", "retain_index", "tokenized_examples"]
