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
import os
import shutil
import uuid
from pathlib import Path

import torch

from tdrl.errors import CheckpointNotFoundError, ConfigError
from tdrl.integrity import read_json, verify_manifest, write_manifest

__all__ = [
    "COMPLETE", "RUN_FILE", "RUN_OUTPUTS", "find_checkpoint", "run_directory", "claim_run_directory",
    "export_model", "keep_newest", "save_checkpoint", "load_checkpoint",
]  # fmt: skip

log = logging.getLogger(__name__)

COMPLETE = "tdrl-checkpoint.json"
#: Beside every exported student (``best/``, a checkpoint, a warm start): what it came from, so
#: ``tdrl eval`` can use the run's own teacher and the agent's decoding temperature.
RUN_FILE = "tdrl-run.json"
#: What a run writes in its directory (cleared by --overwrite, and when a failed start left them).
RUN_OUTPUTS = ("checkpoints", "best", "summary.json")


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
    """One run per directory: refuse to start a new run over an existing one unless resuming it or
    told to ``overwrite``; clear what a failed start left behind (no checkpoint, no summary)."""
    has_run = (out / "summary.json").is_file() or any((out / "checkpoints").glob("step-*"))
    if resumed:
        return
    if has_run and not overwrite:
        raise ConfigError(
            f"{out} already holds a run: continue it with `tdrl train --resume {out}`, replace it with "
            "--overwrite, or choose another --out"
        )
    if out.is_dir():
        for name in RUN_OUTPUTS:
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for events in out.glob("events.out.tfevents.*"):
            events.unlink()


def export_model(student, state_dict: dict, target: Path, files: dict[str, object]) -> None:
    """The student as an ordinary HF model in ``target`` (atomically replaced), from a state dict of the
    whole agent (``student.model.*`` keys; gathered by accelerate), with ``files`` written beside it."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    prefix = "student.model."
    weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    student.model.save_pretrained(tmp, state_dict=weights or None, safe_serialization=True)
    if student.tokenizer is not None:
        student.tokenizer.save_pretrained(tmp)
    if student.value_head is not None:
        from safetensors.torch import save_file

        head = {k: v.detach().contiguous() for k, v in student.value_head.state_dict().items()}
        save_file(head, str(tmp / "value_head.safetensors"))
    for name, value in files.items():
        (tmp / name).write_text(json.dumps(value, indent=2))
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def keep_newest(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints under ``root``."""
    for old in sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(trainer) -> Path:
    """Write ``trainer``'s complete checkpoint atomically (every process takes part: accelerate gathers
    whole weights) into ``out/checkpoints/step-NNNNNNN`` and keep the newest ``keep_last``."""
    accelerator = trainer.accelerator
    root = trainer.out / "checkpoints"
    final = root / f"step-{trainer.step:07d}"
    token = [uuid.uuid4().hex[:8]]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token)
    tmp = root / f".tmp-{trainer.step}-{token[0]}"
    tied = logging.getLogger("accelerate.utils.other")  # it warns on every save that a tied head is
    level = tied.level  # stored once; load_state restores the tie (tested by the bit-exact resume)
    tied.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        tied.setLevel(level)
    state = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        info = trainer._run_info()
        export_model(trainer.student, state, tmp / "student", {RUN_FILE: info})
        (tmp / "config.json").write_text(json.dumps(trainer.args.to_dict(), indent=2))
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer.trainer_state(), indent=2))
        write_manifest(tmp, skip=(COMPLETE,))
        (tmp / COMPLETE).write_text(json.dumps({"step": trainer.step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        keep_newest(root, trainer.args.keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(trainer, checkpoint: Path) -> dict:
    """Restore a verified checkpoint (:func:`find_checkpoint` found and checked it) into ``trainer``:
    weights, optimiser, every process's RNGs and the loss scaler through accelerate, then the schedule.
    Returns the trainer's own state (position in the data order, history, best model); refuses a
    checkpoint whose annotation cache or teacher weights differ from the trainer's."""
    state = read_json(checkpoint / "trainer_state.json", "checkpoint state")
    for key, now, what in (
        ("data_fingerprint", trainer.dataset.meta.get("fingerprint"), "the annotation cache"),
        ("teacher_weights", trainer.teacher.weights_fingerprint(), "the teacher's weights"),
    ):
        if state.get(key) not in (None, now):
            raise ConfigError(
                f"{what} changed since {checkpoint} was written ({state[key]} then, {now} now): resume with "
                "the data and teacher the run started with, or start a new run"
            )
    if state["step"] > trainer.args.steps:
        raise ConfigError(f"checkpoint is at step {state['step']}, past --steps {trainer.args.steps}")
    trainer.accelerator.load_state(str(checkpoint))
    trainer.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    return state
