"""The trainer's plumbing: one accelerate ``Accelerator`` per run, the schedule names, and the rule that
agent metrics never use the trainer's own metric groups; with ``--fsdp`` the Accelerator is
:class:`~tdrl.training.sharding.ShardedAccelerator` (FSDP2, on the CPU too)."""

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
    """One Accelerator per run (FSDP-sharding with ``args.fsdp``); a single process may switch mixed
    precision between runs."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    from tdrl.training.sharding import ShardedAccelerator

    precision = args.optim.mixed_precision
    state = AcceleratorState._shared_state
    if state and state.get("num_processes", 1) == 1 and str(state.get("_mixed_precision")) != precision:
        AcceleratorState._reset_state()
    kind = ShardedAccelerator if args.fsdp else Accelerator
    return kind(
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
    """Whether every parameter holds finite numbers only (one device sync; sharded parameters: every
    process checks its shards, and all agree on the answer)."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    flags = [torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in parameters]
    finite = torch.stack(flags).all() if flags else torch.tensor(True)
    if any(isinstance(p, DTensor) for p in parameters):
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)
