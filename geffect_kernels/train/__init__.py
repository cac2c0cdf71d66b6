"""The unlearning loop: `train(model, forget, retain, TrainConfig(...))`; `Run` and `run_steps` are its parts."""
from .checkpoint import CheckpointError, load_checkpoint
from .loop import Run, TrainingDiverged, TrainResult, check_inputs, check_resumable, run_steps, train
from .resume import ResumeMismatch
from .run_lock import RunFolderBusy
from .schedule import batch_indices, warmup_linear_decay
from .tiny_model import tiny_llama
from .train_config import RETAIN_OBJECTIVES, TrainConfig

__all__ = ["CheckpointError", "RETAIN_OBJECTIVES", "ResumeMismatch", "Run", "RunFolderBusy", "TrainConfig",
           "TrainResult", "TrainingDiverged", "batch_indices", "check_inputs", "check_resumable", "load_checkpoint",
           "run_steps", "tiny_llama", "train", "warmup_linear_decay"]
