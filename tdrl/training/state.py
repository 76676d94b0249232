"""The typed records of a run, each with ``to_dict`` / ``from_dict`` (JSON on disk).

* :class:`Evaluation`: one validation (step, training seconds so far, metrics).
* :class:`TrainerState`: everything the loop needs to continue where it stopped (the optimiser step,
  the position in the seeded data order, the validation history and best model, the latest online
  episodes, and the fingerprints a resume must match); saved in every checkpoint as
  ``trainer_state.json`` beside accelerate's state, and what callbacks receive.
* :class:`TestResult`: the test prompts' metrics of the last and of the best-validation model.
* :class:`RunSummary`: what a run reports (``summary.json``; one row of a comparison).
* :class:`RunInfo`: what an exported student came from (:data:`RUN_FILE` beside every export), so
  ``tdrl eval`` uses the run's teacher and the agent's decoding temperature.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Evaluation", "TrainerState", "TestResult", "RunSummary", "RunInfo", "RUN_FILE", "SUMMARY_FILE"]

#: Beside every exported student (``best/``, a checkpoint, a warm start): its :class:`RunInfo`.
RUN_FILE = "tdrl-run.json"
#: The run's :class:`RunSummary`, in its run directory.
SUMMARY_FILE = "summary.json"


@dataclass
class Evaluation:
    """One validation of the student: at ``step``, after ``train_time_s`` of training."""

    step: int
    metrics: dict[str, float]
    train_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "train_time_s": self.train_time_s, "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Evaluation | None:
        if values is None:
            return None
        return cls(step=values["step"], metrics=dict(values["metrics"]), train_time_s=values.get("train_time_s", 0.0))


@dataclass
class TrainerState:
    """The loop's own state (what a resume restores besides accelerate's weights, optimiser and RNGs).

    Attributes:
        step: optimiser steps taken.
        epoch / consumed: the position in the seeded data order (micro-batches consumed this epoch).
        train_time_s: seconds spent in training steps and collection (not evaluation, not checkpoints).
        history: every validation so far; ``best``: the one ``metric_for_best_model`` prefers.
        online: the latest student episodes (records), when collecting online.
        data_fingerprint / teacher_weights: what the run trains on; a resume must match them.
        eval_records / test_records: fingerprints of the validation and test records (prompts and
            references, :func:`~tdrl.evaluation.records_digest`; None: no test); a resume must match them.
    """

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    train_time_s: float = 0.0
    history: list[Evaluation] = field(default_factory=list)
    best: Evaluation | None = None
    online: list[dict] = field(default_factory=list)
    data_fingerprint: str | None = None
    teacher_weights: str | None = None
    eval_records: str | None = None
    test_records: str | None = None

    @property
    def last(self) -> Evaluation | None:
        return self.history[-1] if self.history else None

    def improves(self, metrics: dict[str, float], key: str, greater_is_better: bool) -> bool:
        """Whether ``metrics`` beat the best so far on ``key`` (a NaN never does)."""
        value = metrics[key]
        if not math.isfinite(value):
            return False
        if self.best is None or not math.isfinite(self.best.metrics[key]):
            return True
        return value > self.best.metrics[key] if greater_is_better else value < self.best.metrics[key]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["history"] = [e.to_dict() for e in self.history]
        out["best"] = self.best.to_dict() if self.best else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainerState:
        values = dict(values)
        values["history"] = [Evaluation.from_dict(e) for e in values.get("history", [])]
        values["best"] = Evaluation.from_dict(values.get("best"))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TestResult:
    """The test prompts' metrics of the last model and of the best-validation one (``best_step``;
    the same dict as ``last`` when the best is the last). ``best_unavailable`` says why ``best`` is
    empty where the best model's weights were not there to test (a resume from a checkpoint older
    than their export, with no checkpoint of that step kept)."""

    __test__ = False  # not a pytest class

    last: dict[str, float]
    best: dict[str, float]
    best_step: int | None = None
    best_unavailable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "last": dict(self.last),
            "best": dict(self.best),
            "best_step": self.best_step,
            "best_unavailable": self.best_unavailable,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TestResult | None:
        if not values:
            return None
        last, missing = dict(values.get("last") or {}), values.get("best_unavailable")
        best = dict(values.get("best") or ({} if missing else last))
        return cls(last=last, best=best, best_step=values.get("best_step"), best_unavailable=missing)


@dataclass
class RunSummary:
    """What one run reports: its agent and seed, how far it got and how long it took, its validation
    history and best model, the test of the last and best model (``test``), the end-of-run probe of
    the decoding policy on training states (``probe``: ``outside_mass``, ``mode_outside``) and the
    resolved config. ``label`` names the row in a comparison (the agent spec, or the starting student)."""

    agent: str
    seed: int
    steps: int
    label: str | None = None
    interrupted: bool = False
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    history: list[Evaluation] = field(default_factory=list)
    best: Evaluation | None = None
    test: TestResult | None = None
    probe: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    rank_fingerprints: list[str] | None = None

    @property
    def last(self) -> Evaluation | None:
        return self.history[-1] if self.history else None

    @classmethod
    def of(cls, config: dict[str, Any], state: TrainerState, *, interrupted: bool, wall_time_s: float) -> RunSummary:
        """The summary of a run with the resolved ``config`` (its dict) that stopped at ``state``."""
        return cls(
            agent=config["agent"],
            seed=config["seed"],
            steps=state.step,
            interrupted=interrupted,
            wall_time_s=wall_time_s,
            train_time_s=state.train_time_s,
            history=list(state.history),
            best=state.best,
            config=config,
        )

    @property
    def out(self) -> str | None:
        return self.config.get("out")

    def test_metric(self, which: str, key: str) -> float:
        """A test metric of the ``"last"`` or ``"best"`` model; NaN where there is none."""
        metrics = getattr(self.test, which) if self.test is not None else {}
        return float(metrics.get(key, math.nan))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["history"] = [e.to_dict() for e in self.history]
        out["best"] = self.best.to_dict() if self.best else None
        out["last"] = self.last.to_dict() if self.last else None
        out["test"] = self.test.to_dict() if self.test else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSummary:
        values = dict(values)
        values["history"] = [Evaluation.from_dict(e) for e in values.get("history", [])]
        values["best"] = Evaluation.from_dict(values.get("best"))
        values["test"] = TestResult.from_dict(values.get("test"))
        if "probe" not in values:  # tdrl 0.1 kept the probe at the top level
            values["probe"] = {k: values[k] for k in ("outside_mass", "mode_outside") if k in values}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class RunInfo:
    """What an exported student came from (:data:`RUN_FILE`)."""

    teacher: str
    teacher_dtype: str
    agent: str
    decode_temperature: float
    step: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
