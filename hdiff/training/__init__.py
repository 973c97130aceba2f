"""Training learned denoisers on fixed sets of GHM samples (docs/architecture.md).

- :mod:`~hdiff.training.config`: ``TrainConfig`` and its TOML tables.
- :mod:`~hdiff.training.data`: ``GHMDataset`` (training set of n samples, disjoint held-out set).
- :mod:`~hdiff.training.loss`: the cross-entropy objective over noise levels.
- :mod:`~hdiff.training.trainer`: ``train`` (accelerate loop, EMA, checkpoints, resume).
- :mod:`~hdiff.training.artifacts`: the run directory and ``load_trained``.
- :mod:`~hdiff.training.rundir`: what ``train`` checks before writing (resume, overwrite, divergence).
"""

from hdiff.training.artifacts import is_run_dir, load_trained
from hdiff.training.checkpoint import (JsonlLog, latest_checkpoint, list_checkpoints, resumable_checkpoint,
                                      verify_checkpoint)
from hdiff.training.config import (
                                   DataConfig,
                                   ModelConfig,
                                   NoiseConfig,
                                   OptimConfig,
                                   RunConfig,
                                   TrainConfig,
                                   load_train_config,
                                   train_config_from_dict,
                                   train_config_to_toml,
)
from hdiff.training.data import GHMDataset, StepBatchSampler
from hdiff.training.loss import diffusion_loss, evaluation_loss
from hdiff.models.registry import model_class, model_kinds, register_model
from hdiff.training.models import build_model
from hdiff.training.rundir import TrainingDiverged
from hdiff.training.trainer import TrainResult, train

__all__ = [
    "TrainConfig", "ModelConfig", "NoiseConfig", "DataConfig", "OptimConfig", "RunConfig",
    "load_train_config", "train_config_from_dict", "train_config_to_toml",
    "GHMDataset", "StepBatchSampler", "diffusion_loss", "evaluation_loss",
    "build_model", "model_class", "model_kinds", "register_model",
    "train", "TrainResult", "load_trained", "is_run_dir", "JsonlLog", "latest_checkpoint", "list_checkpoints",
    "resumable_checkpoint", "verify_checkpoint", "TrainingDiverged",
]
