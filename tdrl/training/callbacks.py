"""Callbacks of the training loop, and the TensorBoard one every run has.

Scalar names: ``train/loss``, ``train/lr``, ``train/grad_norm``, every agent metric under its own
name (``loss/q``, ``q/mean``, ``cql/gap``, ``policy/outside_mass`` ...), ``eval/*`` (see
:data:`tdrl.evaluation.METRICS`; each also ``*_std`` over seeds), ``batch/support_size``,
``batch/support_mass``, ``batch/off_support_frac``, ``perf/tokens_per_s``, ``rollout/*``, and at the
end ``test/*`` and ``test_best/*`` (the same metrics). Text: ``samples``
(prompt / student / teacher, every evaluation). HParams: the run's configuration and every setting of
its agent with its final and best metrics (``hparam/...``), so TensorBoard's HParams tab compares runs.
One run directory per (agent, seed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdrl.training.config import TrainConfig
    from tdrl.training.state import RunSummary, TrainerState

__all__ = ["Tracker", "samples_markdown", "TrainerCallback", "TensorBoardCallback"]


def samples_markdown(samples: list[dict[str, str]]) -> str:
    """A markdown table of (prompt, student, teacher) samples for TensorBoard's text tab."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    rows = ["| prompt | student | teacher |", "|---|---|---|"]
    rows += [f"| {cell(s['prompt'])} | {cell(s['student'])} | {cell(s['teacher'])} |" for s in samples]
    return "\n".join(rows)


class Tracker:
    """A thin TensorBoard writer (``torch.utils.tensorboard``; no TensorFlow needed). ``purge_step``:
    TensorBoard discards what earlier writers of ``log_dir`` logged at this step and after (a resumed
    run's, so the steps a killed run logged past its checkpoint are not shown twice)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        finite = {f"hparam/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        self.writer.add_hparams(clean, finite, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class TrainerCallback:
    """Hooks of the training loop (main process only); every hook may be left out. Each receives the
    run's resolved :class:`~tdrl.training.config.TrainConfig` (``args``) and its
    :class:`~tdrl.training.state.TrainerState` (``state``: step, history, best, ...), plus what the
    event produced; callbacks read them and never change the loop."""

    def on_train_begin(self, args: TrainConfig, state: TrainerState) -> None: ...

    def on_step_end(self, args: TrainConfig, state: TrainerState) -> None:
        """After each optimiser step (``state.step`` already counts it), before evaluation and
        checkpointing."""

    def on_log(self, args: TrainConfig, state: TrainerState, metrics: dict[str, float]) -> None: ...

    def on_evaluate(
        self, args: TrainConfig, state: TrainerState, metrics: dict[str, float], samples: list[dict[str, str]]
    ) -> None: ...

    def on_train_end(self, args: TrainConfig, state: TrainerState, summary: RunSummary) -> None: ...


class TensorBoardCallback(TrainerCallback):
    """Scalars, evaluation samples and hparams into the run directory (``args.out``). Every run opens
    its writer with a session start (``purge_step``): a new run's at step 0, a resumed run's (``state.step``
    > 0 at the start) after its checkpoint's step, so TensorBoard discards what the run it continues
    logged past that checkpoint (steps it is about to log again). TensorBoard's Python loader takes the
    first session start of a directory for a start, not a restart: hence the new run's."""

    def __init__(self):
        self.tracker: Tracker | None = None

    def on_train_begin(self, args, state) -> None:
        self.tracker = Tracker(args.out, purge_step=state.step + 1 if state.step else 0)

    def on_log(self, args, state, metrics) -> None:
        self.tracker.scalars(metrics, state.step)

    def on_evaluate(self, args, state, metrics, samples) -> None:
        self.tracker.scalars(metrics, state.step)
        self.tracker.text("samples", samples_markdown(samples), state.step)

    def on_train_end(self, args, state, summary) -> None:
        if not summary.interrupted:
            test = summary.test
            if test is not None:
                for group, metrics in (("test", test.last), ("test_best", test.best)):
                    self.tracker.scalars({k.replace("eval/", f"{group}/"): v for k, v in metrics.items()}, state.step)
            final = dict(summary.last.metrics) if summary.last else {}
            final.update({f"best_{k}": v for k, v in (summary.best.metrics if summary.best else {}).items()})
            if test is not None:
                for which, metrics in (("last", test.last), ("best", test.best)):
                    final.update({f"test_{which}_{k.split('/')[1]}": v for k, v in metrics.items()})
            self.tracker.hparams(args.hparams(), final)
        self.tracker.close()
