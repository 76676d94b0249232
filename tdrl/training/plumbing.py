"""The trainer's plumbing: one accelerate ``Accelerator`` per run, the schedule names, and the rule that
agent metrics never use the trainer's own metric groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tdrl.agents.base import TRAINER_METRIC_GROUPS
from tdrl.errors import ConfigError

if TYPE_CHECKING:
    from tdrl.training.config import TrainConfig

__all__ = ["SCHEDULES", "make_accelerator", "check_metric_names", "all_finite"]

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def make_accelerator(args: TrainConfig):
    """One Accelerator per run; a single process may switch mixed precision between runs."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    precision = args.optim.mixed_precision
    state = AcceleratorState._shared_state
    if state and state.get("num_processes", 1) == 1 and str(state.get("_mixed_precision")) != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=torch.device(args.device).type == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=args.optim.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def check_metric_names(metrics: dict) -> None:
    """Agent metrics and trainer metrics never share a key: the trainer's groups are reserved."""
    for key in metrics:
        if key.startswith(TRAINER_METRIC_GROUPS):
            raise ConfigError(
                f"agent metric {key!r} uses a group the trainer logs itself ({', '.join(TRAINER_METRIC_GROUPS)}): "
                "rename it"
            )


def all_finite(parameters) -> bool:
    """Whether every parameter holds finite numbers only (one device sync)."""
    flags = [torch.isfinite(p).all() for p in parameters]
    return bool(torch.stack(flags).all()) if flags else True
