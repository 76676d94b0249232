"""N processes writing one data directory (``accelerate launch`` / ``torchrun`` of ``tdrl annotate`` or
``tdrl generate-responses``): who writes which shard, and how the processes wait for each other.

The protocol (:func:`tdrl.data.annotate` and :func:`tdrl.data.generate_responses` follow it):

1. rank 0 takes the directory's :class:`~tdrl.integrity.DirectoryLock` and holds it to the end; the
   other ranks never lock, they write only what rank 0 hands them (:meth:`Ranks.holding`);
2. every rank checks that all of them run the same job (:meth:`Ranks.agree`: one fingerprint of the
   settings, the data and the teacher's weights);
3. rank 0 checks or creates the directory and lists the shards left to write (:meth:`Ranks.on_main`);
4. rank ``r`` of ``N`` writes every N-th of them, from the r-th on (:meth:`Ranks.mine`), each shard
   sealed on its own as in one process; a shard's content depends on its index only, never on the rank
   that wrote it, so N processes write the cache one process writes (:meth:`Ranks.on_all`);
5. once every rank has finished, rank 0 seals the directory's metadata (:meth:`Ranks.on_main`).

Every step that can fail ends in an exchange of its outcome, so an error on one rank is raised on every
rank (the failing one keeps its traceback) instead of leaving the others waiting for a rank that will
never come. Outcomes travel as JSON over a gloo process group (no pickle).
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tdrl import errors
from tdrl.errors import ConfigError

__all__ = ["Ranks", "WAIT_LIMIT"]

#: How long a rank waits for the others at one exchange: a rank that finished its shards waits there
#: for the slowest one (and for rank 0's seal), so the limit is long; a rank that dies ends the launch.
WAIT_LIMIT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``world_size`` processes that write one directory (one process:
    ``Ranks()``); ``group`` is their gloo process group. Build it with :meth:`from_environment`."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """The ranks of a ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1; the launcher sets
        ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), the default process group initialised with gloo
        unless it already is (then a gloo group beside it); one process otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo", timeout=WAIT_LIMIT)
        group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=WAIT_LIMIT)
        return cls(dist.get_rank(), dist.get_world_size(), group, owns)

    def close(self) -> None:
        """Destroy the process group if :meth:`from_environment` made it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def mine(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th, from the ``rank``-th on."""
        return list(items)[self.rank :: self.world_size]

    def gather(self, value) -> list:
        """Every rank's ``value`` (JSON), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch
        import torch.distributed as dist

        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([data.numel()]), group=self.group)
        width = max(int(s) for s in sizes)
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[: data.numel()] = data
        out = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(out, padded, group=self.group)
        return [json.loads(o[: int(s)].numpy().tobytes()) for o, s in zip(out, sizes)]

    def agree(self, value: str, what: str) -> None:
        """Every rank has the same ``value`` (e.g. a fingerprint of the job), else ConfigError on all."""
        values = self.gather(value)
        if len(set(values)) > 1:
            ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ConfigError(
                f"the {self.world_size} processes do not run the same job ({what} differ: {ranks}): launch every "
                "process with the same command, data and teacher"
            )

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only; its result (JSON) on every rank, or its error raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        outcome = self.gather(_describe(error) if error is not None else {"result": result})[0]
        _raise_first([outcome], error)
        return outcome["result"]

    def on_all(self, fn: Callable[[], Any]) -> None:
        """``fn()`` on every rank; once all are done, the first failing rank's error is raised on every rank."""
        error = None
        try:
            fn()
        except Exception as exc:
            error = exc
        _raise_first(self.gather(_describe(error) if error is not None else {}), error)

    @contextmanager
    def holding(self, lock) -> Iterator[None]:
        """Rank 0 holds ``lock`` (a :class:`~tdrl.integrity.DirectoryLock`) for the block, the others run
        it without; if rank 0 cannot take it (another job writes there), every rank raises its error."""

        def take() -> None:
            lock.__enter__()

        self.on_main(take)
        try:
            yield
        finally:
            if self.is_main:
                lock.__exit__(None, None, None)


def _describe(error: BaseException) -> dict:
    return {"error": type(error).__name__, "message": str(error)}


def _raise_first(outcomes: list[dict], own: BaseException | None) -> None:
    """Raise the first failing rank's error: a failing rank re-raises its own (traceback intact), the
    others the same class (a tdrl error or a builtin; else RuntimeError) with the same message."""
    failed = [(r, o) for r, o in enumerate(outcomes) if "error" in o]
    if not failed:
        return
    if own is not None:
        raise own
    where, outcome = failed[0]
    name, message = outcome["error"], outcome["message"]
    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(message)
        except TypeError:  # a builtin that wants other arguments
            exc = None
        if exc is not None:
            raise exc
    raise RuntimeError(f"rank {where} failed with {name}: {message}")
