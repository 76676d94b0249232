"""Auxiliary loss terms: weighted terms the caller adds to an agent's loss through
``agent(batch, auxiliary=[...])`` (:meth:`tdrl.agents.base.Agent.forward`), e.g. MiniLLM's
pre-training term J_PT on plain text (:meth:`tdrl.training.online.PretrainText.term`).

A term is data plus a function: the agent does not need to know it, the trainer does not need to
know the agent. ``forward`` computes ``value, metrics = term.fn(agent, term.inputs)`` for each term,
adds ``term.coef * value`` to the loss (the gradient flows through ``value``) and logs the
unweighted ``value`` as ``loss/<name>`` beside the term's own metrics::

    def l2(agent, inputs):
        value = sum(p.pow(2).sum() for p in agent.student.parameters())
        return value, {}

    loss, metrics = agent(batch, auxiliary=[AuxiliaryTerm("l2", 1e-4, {}, l2)])   # metrics["loss/l2"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tdrl.agents.ops import detached
from tdrl.errors import ConfigError

__all__ = ["AuxiliaryTerm", "add_auxiliary"]

_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class AuxiliaryTerm:
    """One term ``coef * fn(agent, inputs)[0]`` added to the agent's loss by ``Agent.forward``.

    Attributes:
        name: lower-case letters, digits and ``_``; its metric is ``loss/<name>`` (the unweighted value).
        coef: its weight (a finite number; 0 computes and logs the term without training on it).
        inputs: what ``fn`` reads (tensors, on any device: ``fn`` moves them where it computes).
        fn: ``(agent, inputs) -> (loss, metrics)``: a 0-dim tensor with its gradient, and a dict of
            further metrics (``group/name`` keys; detached by ``forward``).
    """

    name: str
    coef: float
    inputs: Mapping[str, Any]
    fn: Callable[[Any, Mapping[str, Any]], tuple[Tensor, dict[str, Any]]]

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"auxiliary term name {self.name!r} must be lower-case letters, digits and '_' (its metric is "
                "loss/<name>)"
            )
        if isinstance(self.coef, bool) or not isinstance(self.coef, int | float) or not math.isfinite(self.coef):
            raise ConfigError(f"auxiliary term {self.name!r}: coef must be a finite number, got {self.coef!r}")
        if not isinstance(self.inputs, Mapping):
            raise ConfigError(f"auxiliary term {self.name!r}: inputs must be a dict, got {type(self.inputs).__name__}")
        if not callable(self.fn):
            raise ConfigError(f"auxiliary term {self.name!r}: fn must be callable (agent, inputs) -> (loss, metrics)")


def add_auxiliary(agent, loss: Tensor, metrics: dict, terms: Sequence[AuxiliaryTerm]) -> Tensor:
    """``loss + sum(term.coef * value)`` over ``terms``; writes ``loss/<name>`` (the unweighted value)
    and each term's metrics into ``metrics``. A metric name already in use is a ConfigError (rename
    the term), as is anything in ``terms`` that is not an :class:`AuxiliaryTerm`."""
    if isinstance(terms, AuxiliaryTerm):
        raise ConfigError("auxiliary takes a sequence of AuxiliaryTerm: pass auxiliary=[term]")
    for term in terms:
        if not isinstance(term, AuxiliaryTerm):
            raise ConfigError(f"auxiliary takes AuxiliaryTerm objects, got {type(term).__name__}")
        key = f"loss/{term.name}"
        value, extra = term.fn(agent, term.inputs)
        if not (isinstance(value, Tensor) and value.dim() == 0):
            raise ConfigError(f"auxiliary term {term.name!r}: fn must return a 0-dim loss tensor, got {value!r}")
        taken = sorted((set(extra) | {key}) & set(metrics))
        if taken:
            raise ConfigError(f"auxiliary term {term.name!r} logs {', '.join(taken)}, already logged: rename the term")
        loss = loss + term.coef * value
        metrics.update(detached(extra))
        metrics[key] = value.detach()
    return loss
