"""Training: the arguments (:mod:`~tdrl.training.args`), the loop on accelerate
(:mod:`~tdrl.training.trainer`), building it from names and resuming it (:mod:`~tdrl.training.build`),
checkpoints, online collection and J_PT, callbacks, and the shared warm start."""

from tdrl.training.args import TrainConfig, parse_train_args
from tdrl.training.build import build_trainer, resume_trainer, set_seed
from tdrl.training.callbacks import TensorBoardCallback, TrainerCallback
from tdrl.training.trainer import Trainer

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainerCallback",
    "TensorBoardCallback",
    "build_trainer",
    "parse_train_args",
    "resume_trainer",
    "set_seed",
]
