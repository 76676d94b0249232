"""Where a resumed run continues, and what of its run directory agrees with that.

A run resumes from one checkpoint (a :class:`ResumePoint`). What its directory holds from after that
checkpoint (newer checkpoints, a ``best/`` exported later, the summary of a longer run) would be taken
as the run's by ``tdrl eval`` and by a later ``--resume``: resuming a checkpoint the user named while
they are there is refused, or with ``--overwrite`` they are deleted (:func:`newer_outputs`). Then
``best/`` is made to agree with the checkpoint's best model (:func:`reconcile_best`): an export of
another step is removed (a killed run may have exported a new best after its last checkpoint), and
where the best model is not exported it is restored from a kept checkpoint of its step or, if none
is kept, its test is skipped with a warning (:func:`best_unavailable`), never run on other weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tdrl.errors import ConfigError
from tdrl.integrity import atomic_dir, verify_manifest
from tdrl.training.checkpoints import COMPLETE, export_model
from tdrl.training.state import RUN_FILE, SUMMARY_FILE, Evaluation, RunInfo

__all__ = [
    "BEST_FILE",
    "ResumePoint",
    "continue_run",
    "newer_outputs",
    "refuse_newer_outputs",
    "reconcile_best",
    "holds_best",
    "best_unavailable",
    "export_best",
]

log = logging.getLogger(__name__)

#: Beside the student in ``best/``: the step and validation metrics it was exported with.
BEST_FILE = "metrics.json"


@dataclass
class ResumePoint:
    """Where a resumed run continues: the ``step`` and ``best`` model of its checkpoint; ``explicit``:
    the user named that checkpoint (not the run's newest intact one); ``discard_newer``: ``--overwrite``
    with ``--resume``, delete tdrl's outputs newer than the checkpoint instead of refusing them."""

    step: int
    best: Evaluation | None = None
    explicit: bool = False
    discard_newer: bool = False


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix("step-")
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else None


def _export_record(best: Path) -> dict | None:
    """A tdrl ``best/`` export's :data:`BEST_FILE` (``step`` and ``metrics``); None where there is none."""
    try:
        record = json.loads((best / BEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def newer_outputs(out: Path, step: int) -> list[Path]:
    """What ``out`` holds from after ``step``: complete checkpoints of later steps, a ``best/`` export
    of a later step, a summary of a run longer than ``step``."""
    found = [p for p in sorted((out / "checkpoints").glob("step-*")) if (_step_of(p) or 0) > step]
    found = [p for p in found if (p / COMPLETE).is_file()]
    record = _export_record(out / "best")
    if record is not None and record["step"] > step and (out / "best" / RUN_FILE).is_file():
        found.append(out / "best")
    try:
        steps = json.loads((out / SUMMARY_FILE).read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        steps = None
    if isinstance(steps, int) and steps > step:
        found.append(out / SUMMARY_FILE)
    return found


def refuse_newer_outputs(out: Path, point: ResumePoint) -> list[Path]:
    """A resume from a checkpoint the user named, while ``out`` holds outputs newer than it (which
    ``tdrl eval`` and a later ``--resume`` of the run would take as the run's), is refused unless
    ``point.discard_newer``; returns what ``discard_newer`` deletes (a symbolic link among them is
    refused: nothing is deleted through one). A resume of the run directory (its newest intact
    checkpoint) refuses nothing: its newer checkpoints are damaged ones, and a newer ``best/`` is the
    one :func:`reconcile_best` replaces."""
    newer = newer_outputs(out, point.step)
    if newer and point.explicit and not point.discard_newer:
        names = ", ".join(str(p.relative_to(out)) for p in newer)
        raise ConfigError(
            f"{out} holds {names}, newer than the checkpoint of step {point.step} resumed from (later commands would "
            f"take them as the run's): resume {out} to continue its newest checkpoint, or pass --overwrite with "
            "--resume to delete them (tdrl's files only)"
        )
    if not point.discard_newer:
        return []
    for path in newer:
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link: tdrl never deletes through links; remove it yourself")
    return newer


def reconcile_best(out: Path, best: Evaluation | None) -> None:
    """Make ``out/best`` agree with ``best``, the best model of the checkpoint a run resumes from: an
    export of another step (one a killed run wrote after its last checkpoint) is removed, never
    tested as the best model; where ``best`` is not exported, it is restored from a kept checkpoint of
    its step, else a warning says so (its test is skipped unless a later validation beats it)."""
    target = out / "best"
    if target.is_dir() and not holds_best(target, best):
        if any(target.iterdir()):
            if not (target / RUN_FILE).is_file():
                raise ConfigError(
                    f"{target} holds files that are not a tdrl export (no {RUN_FILE}): move them, then resume the run"
                )
            log.warning(
                "%s holds the student of step %s, not the best model of the checkpoint resumed from (%s): removed",
                target,
                (_export_record(target) or {}).get("step"),
                f"step {best.step}" if best else "none yet",
            )
        shutil.rmtree(target)
    if best is None or target.exists():
        return
    source = out / "checkpoints" / f"step-{best.step:07d}"
    if not source.is_symlink() and (source / COMPLETE).is_file() and not verify_manifest(source):
        with atomic_dir(target) as tmp:
            shutil.copytree(source / "student", tmp, dirs_exist_ok=True)
            (tmp / BEST_FILE).write_text(json.dumps({"step": best.step, "metrics": best.metrics}, indent=2))
        log.info("restored %s (step %d) from %s", target, best.step, source)
    else:
        log.warning(
            "the best model so far (step %d) is not in best/ and no checkpoint of it is kept: its test will be skipped "
            "unless a later validation beats it",
            best.step,
        )


def holds_best(target: Path, best: Evaluation | None) -> bool:
    """Whether the export ``target`` holds the student of ``best`` (its step and metrics)."""
    record = _export_record(target)
    if best is None or record is None or record["step"] != best.step:
        return False
    return json.dumps(record.get("metrics"), sort_keys=True) == json.dumps(best.metrics, sort_keys=True)


def best_unavailable(out: Path, best: Evaluation) -> str | None:
    """Why ``out/best`` does not hold ``best``'s weights (logged as a warning), else None."""
    if holds_best(out / "best", best):
        return None
    why = (
        f"best/ does not hold the best-validation model (step {best.step}; the run this one resumed replaced it "
        f"after its last checkpoint) and no checkpoint of step {best.step} is kept: it is not tested, test.best is "
        "empty (the last model's test stands)"
    )
    log.warning(why)
    return why


def continue_run(out: Path, resumed: ResumePoint | None) -> None:
    """Settle the run directory ``out`` of a ``resumed`` run (nothing for a new run): what is newer
    than its checkpoint is refused or deleted (:func:`refuse_newer_outputs`; never through a link),
    then ``best/`` is reconciled (:func:`reconcile_best`). The caller holds the directory's lock."""
    if resumed is None:
        return
    for path in refuse_newer_outputs(out, resumed):  # what is left is --overwrite's to delete
        log.warning("deleting %s, newer than the checkpoint of step %d resumed from", path, resumed.step)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    reconcile_best(out, resumed.best)


def export_best(student, state_dict: dict, out: Path, best: Evaluation, run_info: RunInfo) -> None:
    """The student of the validation ``best`` into ``out/best`` (:func:`export_model`), with its
    :data:`BEST_FILE` (step and metrics, what :func:`holds_best` reads back) and ``run_info``."""
    record = {"step": best.step, "metrics": best.metrics}
    export_model(student, state_dict, out / "best", {BEST_FILE: record, RUN_FILE: run_info.to_dict()})
