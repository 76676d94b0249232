"""TensorBoard logging: scalars under documented names, text samples, and hparams.

Scalar names: ``train/loss``, ``train/lr``, ``train/grad_norm``, every agent metric under its own
name (``loss/q``, ``q/mean``, ``cql/gap``, ...), ``eval/rougeL``, ``eval/teacher_nll``,
``eval/coverage``, ``eval/answer_match``, ``eval/length``, ``eval/terminated`` (each also ``*_std``
over seeds), ``data/support_size``, ``data/support_mass``, ``data/off_support_frac``,
``perf/tokens_per_s``. Text: ``samples`` (prompt / student / teacher, every evaluation). HParams:
the run's configuration with its final and best metrics (``hparam/...``), so TensorBoard's HParams
tab compares runs. One run directory per (agent, seed).
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["Tracker", "samples_markdown"]


def samples_markdown(samples: list[dict[str, str]]) -> str:
    """A markdown table of (prompt, student, teacher) samples for TensorBoard's text tab."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    rows = ["| prompt | student | teacher |", "|---|---|---|"]
    rows += [f"| {cell(s['prompt'])} | {cell(s['student'])} | {cell(s['teacher'])} |" for s in samples]
    return "\n".join(rows)


class Tracker:
    """A thin TensorBoard writer (``torch.utils.tensorboard``; no TensorFlow needed)."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

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
