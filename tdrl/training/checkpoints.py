"""Checkpoints and run directories.

A checkpoint is written into a temporary directory by :meth:`~accelerate.Accelerator.save_state` (the
agent's weights gathered whole under FSDP / DeepSpeed, every optimiser, every process's RNG states), plus
the scheduler, the trainer's own state as JSON (step, epoch position of the data, history, best model,
online episodes, fingerprints of the data cache and of the teacher), the config, the student as an
ordinary Hugging Face model, and a manifest of every file's size and sha256; then it is renamed into
``out/checkpoints/step-NNNNNNN`` and marked complete. Nothing is unpickled on load: accelerate reads its
files with ``torch.load(weights_only=True)``, and tdrl does the same for the scheduler (the data order is
JSON, not a registered object, because accelerate loads registered objects with ``weights_only=False``).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from tdrl.errors import CheckpointNotFoundError, ConfigError
from tdrl.integrity import atomic_dir, read_json, verify_manifest, write_manifest
from tdrl.training.state import RUN_FILE, SUMMARY_FILE, RunInfo, TrainerState

__all__ = [
    "COMPLETE",
    "RUN_FILE",
    "CONFIG_FILE",
    "STATE_FILE",
    "SCHEDULER_FILE",
    "RUN_OUTPUTS",
    "RUN_MARKER",
    "find_checkpoint",
    "run_directory",
    "claim_run_directory",
    "export_model",
    "keep_newest",
    "save_checkpoint",
    "load_checkpoint",
    "FINGERPRINTS",
]

log = logging.getLogger(__name__)

#: Written last into a checkpoint: it is complete.
COMPLETE = "tdrl-checkpoint.json"
#: A checkpoint's resolved config, the trainer's state, and the schedule's state.
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
#: Written when a run claims its directory: what is there was written by tdrl (a failed start's
#: leftovers are cleared; a directory without it is the user's, and nothing in it is deleted unasked).
RUN_MARKER = ".tdrl-run.json"
#: What a run writes in its directory (cleared by --overwrite, and when a failed start left them).
RUN_OUTPUTS = ("checkpoints", "best", SUMMARY_FILE)


def find_checkpoint(path: str | Path, *, verify: bool = False) -> Path:
    """``path`` itself if it is a complete checkpoint, else the newest complete one under
    ``path/checkpoints``; :class:`~tdrl.errors.CheckpointNotFoundError` if there is none.

    With ``verify`` every file is checked against the checkpoint's manifest (sizes and sha256): a
    damaged checkpoint is skipped with a warning naming the file, and the previous complete one is
    used; if none is intact, the error lists what is wrong with each."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        candidates = [path]
    else:
        candidates = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / COMPLETE).is_file())[::-1]
    if not candidates:
        raise CheckpointNotFoundError(
            f"no complete checkpoint in {path}: pass a run directory written by `tdrl train` or one of its "
            "checkpoints/step-* directories"
        )
    if not verify:
        return candidates[0]
    damaged = []
    for candidate in candidates:
        problems = verify_manifest(candidate)
        if not problems:
            if damaged:
                log.warning("skipping damaged checkpoint(s): %s; using %s", "; ".join(damaged), candidate)
            return candidate
        damaged.append(f"{candidate.name}: {problems[0]}")
    raise CheckpointNotFoundError(f"no intact checkpoint in {path} ({'; '.join(damaged)}): start the run again")


def run_directory(path: str | Path) -> Path:
    """The run directory a path names: a run itself, or the run of a ``checkpoints/step-*`` directory."""
    path = Path(path)
    if (path / COMPLETE).is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def claim_run_directory(out: Path, *, resumed: bool, overwrite: bool) -> None:
    """One run per directory, and nothing of the user's lost: refuse to start a new run over an existing
    one unless resuming it or told to ``overwrite``; refuse a directory whose ``best/``, ``checkpoints/``,
    summary or event files no tdrl run of this directory wrote (it has no :data:`RUN_MARKER`) unless
    told to ``overwrite``; never follow a symbolic link there (a linked ``checkpoints/`` would write
    into, and rotate, another run's checkpoints). Clears what a failed start of this run left behind,
    then marks the directory as this run's (a ``resumed`` run's: :func:`tdrl.training.resume.continue_run`)."""
    inside = next((p for p in out.resolve().parents if (p / RUN_MARKER).is_file()), None)
    if inside is not None:
        raise ConfigError(
            f"{out} lies inside the run directory {inside}, whose checkpoints and best/ are rotated and replaced: "
            "choose an --out outside it"
        )
    links = [out / name for name in RUN_OUTPUTS if (out / name).is_symlink()]
    if links and (resumed or not overwrite):
        raise ConfigError(
            f"{links[0]} is a symbolic link: tdrl never writes through links in a run directory; remove it, "
            "choose another --out" + ("" if resumed else ", or pass --overwrite (removes the link, not its target)")
        )
    _clear_partial_writes(out)
    if resumed:
        return
    for link in links:
        link.unlink()  # the link only: its target belongs to someone else
    has_run = (out / SUMMARY_FILE).is_file() or any((out / "checkpoints").glob("step-*"))
    if has_run and not overwrite:
        raise ConfigError(
            f"{out} already holds a run: continue it with `tdrl train --resume {out}`, replace it with "
            "--overwrite, or choose another --out"
        )
    present = [out / name for name in RUN_OUTPUTS if (out / name).exists()] + sorted(out.glob("events.out.tfevents.*"))
    if present and not overwrite and not (out / RUN_MARKER).is_file():
        names = ", ".join(str(p.relative_to(out)) for p in present)
        raise ConfigError(
            f"{out} holds {names}, which no tdrl run of this directory wrote: choose another --out, or pass "
            "--overwrite (it deletes tdrl's files there: step-* checkpoints, a tdrl best/, summary, events)"
        )
    best = out / "best"
    if best.is_dir() and any(best.iterdir()) and not (best / RUN_FILE).is_file():
        raise ConfigError(
            f"{best} holds files that are not a tdrl export (no {RUN_FILE}): move them, or choose another --out "
            "(--overwrite replaces what tdrl wrote, nothing else)"
        )
    for target in present:
        if target.name == "checkpoints" and target.is_dir():  # tdrl's checkpoints only; anything else stays
            for entry in target.iterdir():
                if entry.name.startswith("step-") and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(json.dumps({"run": "tdrl"}))


def _clear_partial_writes(out: Path) -> None:
    """Remove what a writer killed mid-write left (``atomic_dir``'s ``.NAME.tmp-*`` and ``.NAME.old-*`` of
    ``best/`` and of checkpoints): the run directory is locked, so no one else is writing them."""
    for pattern in (".best.tmp-*", ".best.old-*", "checkpoints/.step-*.tmp-*", "checkpoints/.step-*.old-*"):
        for leftover in out.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)


def export_model(student, state_dict: dict, target: Path, files: dict[str, object]) -> None:
    """The student as an ordinary HF model in ``target`` (atomically replaced: :func:`atomic_dir`), from
    a state dict of the whole agent (``student.model.*`` keys; gathered by accelerate), with ``files``
    (name -> JSON value) written beside it."""
    prefix = "student.model."
    weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    head = {k[len("student.value_head.") :]: v for k, v in state_dict.items() if k.startswith("student.value_head.")}
    with atomic_dir(target) as tmp:  # the value head too from the gathered weights (FSDP shards the live one)
        student.save_pretrained(tmp, state_dict=weights or None, value_head=head or None)
        for name, value in files.items():
            (tmp / name).write_text(json.dumps(value, indent=2))


def keep_newest(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints under ``root``."""
    for old in sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator,
    model,
    scheduler,
    student,
    out: Path,
    *,
    state: TrainerState,
    config: dict,
    run_info: RunInfo,
    keep_last: int,
) -> Path:
    """Write a complete checkpoint of step ``state.step`` into ``out/checkpoints/step-NNNNNNN``
    atomically and keep the newest ``keep_last``. Every process calls it (accelerate gathers whole
    weights from the prepared ``model``); the main process writes the scheduler, the student as an HF
    model, ``config`` (the resolved config's dict), ``run_info``, ``state`` and the manifest."""
    root = out / "checkpoints"
    final = root / f"step-{state.step:07d}"
    token = [uuid.uuid4().hex[:8]]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token)
    tied = logging.getLogger("accelerate.utils.other")  # it warns on every save that a tied head is
    level = tied.level  # stored once; load_state restores the tie (tested by the bit-exact resume)
    with (
        atomic_dir(final, token=token[0], shared=True)
        if accelerator.is_main_process
        else _shared(final, token[0]) as tmp
    ):
        tied.setLevel(logging.ERROR)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
        finally:
            tied.setLevel(level)
        weights = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            export_model(student, weights, tmp / "student", {RUN_FILE: run_info.to_dict()})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            (tmp / RUN_FILE).write_text(json.dumps(run_info.to_dict(), indent=2))
            (tmp / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2))
            write_manifest(tmp, skip=(COMPLETE,))
            (tmp / COMPLETE).write_text(json.dumps({"step": state.step}))
    if accelerator.is_main_process:
        keep_newest(root, keep_last)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _shared(final: Path, token: str):
    """The temporary directory the main process's :func:`atomic_dir` made (other ranks write into it)."""
    yield final.with_name(f".{final.name}.tmp-{token}")


#: What a resume must match, with what each fingerprints (TrainerState fields).
FINGERPRINTS = {
    "data_fingerprint": "the annotation cache",
    "teacher_weights": "the teacher's weights",
    "eval_records": "the validation records (the prompts and references of --eval-data)",
    "test_records": "the test records (the prompts and references of --test-data)",
}


def load_checkpoint(accelerator, scheduler, checkpoint: Path, *, expected: TrainerState, max_step: int) -> TrainerState:
    """Restore a verified checkpoint (:func:`find_checkpoint` found and checked it): weights,
    optimiser, every process's RNGs and the loss scaler through accelerate, then the schedule; returns
    the trainer's state. Refuses a checkpoint whose annotation cache, teacher weights, validation or
    test records (:data:`FINGERPRINTS`) differ from ``expected``'s (a checkpoint written before tdrl
    recorded the records resumes with a warning), or whose step is past ``max_step``."""
    values = read_json(checkpoint / STATE_FILE, "checkpoint state")
    state = TrainerState.from_dict(values)
    if not {"eval_records", "test_records"} <= set(values):
        log.warning(
            "%s was written before tdrl recorded the validation and test records: it resumes, but a change to "
            "--eval-data or --test-data since cannot be detected",
            checkpoint,
        )
    for name, what in FINGERPRINTS.items():
        then, now = getattr(state, name), getattr(expected, name)
        if name in values and then != now and (then is not None or name.endswith("_records")):
            raise ConfigError(
                f"{what} changed since {checkpoint} was written ({then} then, {now} now): resume with "
                "the data, teacher and evaluation prompts the run started with, or start a new run"
            )
        setattr(state, name, then if then is not None else now)
    if state.step > max_step:
        raise ConfigError(f"checkpoint is at step {state.step}, past --steps {max_step}")
    accelerator.load_state(str(checkpoint))
    scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_FILE, weights_only=True))
    return state
