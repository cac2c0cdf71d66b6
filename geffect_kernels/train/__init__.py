"""The minimal unlearning loop: `train(model, forget, retain, TrainConfig(...))`."""
from .checkpoint import load_checkpoint
from .train_config import RETAIN_OBJECTIVES, TrainConfig
from .loop import TrainingDiverged, TrainResult, train
from .schedule import batch_indices, warmup_linear_decay
from .tiny_model import tiny_llama

__all__ = ["RETAIN_OBJECTIVES", "TrainConfig", "TrainResult", "TrainingDiverged", "batch_indices",
           "load_checkpoint", "tiny_llama", "train", "warmup_linear_decay"]
