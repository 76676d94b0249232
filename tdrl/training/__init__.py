"""Training: the settings (:mod:`~tdrl.training.config`, parsed by :mod:`~tdrl.training.args`), the
loop on accelerate (:mod:`~tdrl.training.trainer`) and its typed state (:mod:`~tdrl.training.state`),
building it from names and resuming it (:mod:`~tdrl.training.build`), checkpoints, online collection
and J_PT, callbacks, and the shared warm start."""

from tdrl.training.args import parse_train_args
from tdrl.training.build import build_trainer, resume_trainer, set_seed
from tdrl.training.callbacks import TensorBoardCallback, TrainerCallback
from tdrl.training.config import (
    DataConfig,
    EvalSettings,
    LMConfig,
    OnlineConfig,
    OptimConfig,
    TestSettings,
    TrainConfig,
)
from tdrl.training.state import Evaluation, RunInfo, RunSummary, TestResult, TrainerState
from tdrl.training.trainer import Trainer

__all__ = [
    "TrainConfig",
    "OptimConfig",
    "DataConfig",
    "EvalSettings",
    "TestSettings",
    "OnlineConfig",
    "LMConfig",
    "Trainer",
    "TrainerState",
    "RunSummary",
    "TestResult",
    "Evaluation",
    "RunInfo",
    "TrainerCallback",
    "TensorBoardCallback",
    "build_trainer",
    "parse_train_args",
    "resume_trainer",
    "set_seed",
]
