"""The shared warm start: a student that already writes, before any top-p agent shapes it.

The top-p MDP can only shape a student that already decodes: its losses live on the teacher's set
A_p(s), so a student that starts far from the teacher (a raw layer cut writes no words) gets little
signal where it actually samples. The paper starts every method from SFT students; tdrl does the same
with :func:`warm_start`: full-vocabulary word-level KD (``bc:mode=kd``) on the cached annotation,
exported as an ordinary Hugging Face model that any ``--student DIR`` then starts from.

The output directory is fingerprinted by every setting that shapes the weights (the teacher's weights
hash, the student, the data, the optimisation); rerunning with the same settings reuses it, other
settings are refused unless ``overwrite``. Training happens in a sibling ``.<name>.partial-<fp>``
directory whose checkpoints make an interrupted warm start resume, and is renamed into place only
when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tdrl.data import ANNOTATION_META
from tdrl.data.layout import SCHEMA
from tdrl.errors import CheckpointNotFoundError, DataError
from tdrl.integrity import atomic_dir, file_digest, read_json
from tdrl.training.config import TrainConfig, config_leaves, resolve_device

__all__ = [
    "warm_start",
    "warm_start_config",
    "WARM_START_FILE",
    "WARM_START_AGENT",
    "warm_start_fingerprint",
    "RECIPE",
]

WARM_START_FILE = "tdrl-warm-start.json"
#: The warm start's method: word-level KD from the teacher on A_p(s) to the full-vocabulary student.
WARM_START_AGENT = ("bc", "mode=kd")
#: The measured recipe (benchmarks/warm_start_curve.py, RESULTS.md "The warm start"): a 16-layer cut of the
#: bundled teacher (every other layer and the last), full-vocabulary KD on one teacher response to every
#: bundled training prompt, batch 8, lr 1e-4 held constant after a fixed 16-step warm-up (so the first S
#: steps of a longer run are the S-step warm start: the curve's points are warm starts), bf16 autocast
#: and a bf16 teacher (2.2x faster on CPU). ``tdrl demo`` and the reproduction start from it.
RECIPE = {
    "student": "layers:0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,29",
    "train_prompts": 0,
    "response_tokens": 40,
    "batch_size": 8,
    "lr": 1e-4,
    "schedule": "constant",
    "warmup_steps": 16,
    "mixed_precision": "bf16",
    "teacher_dtype": "bfloat16",
}
#: What a warm start takes from the recipe rather than from the run it starts: its optimisation.
_RECIPE_OPTIMISATION = ("batch_size", "schedule", "warmup_steps")


def warm_start_config(config: TrainConfig, steps: int, lr: float, recipe: dict = RECIPE) -> TrainConfig:
    """The warm start of the runs ``config`` describes: their teacher, student, data, precision and
    optimiser, with the recipe's batch, schedule and warm-up (capped at ``steps``; a key the recipe lacks
    stays ``config``'s), ``steps`` steps at ``lr``, seed 0 and no accumulation. ``tdrl demo`` and the
    reproduction build theirs here, so the same settings give the same fingerprint (one cached warm
    start)."""
    settings = {k: recipe[k] for k in _RECIPE_OPTIMISATION if k in recipe}
    if "warmup_steps" in settings:
        settings["warmup_steps"] = min(settings["warmup_steps"], steps)
    return config.replace(**settings, steps=steps, lr=lr, seed=0, grad_accum=1)


#: The top-level settings that shape a warm start's weights; besides them, every setting of the
#: ``optim`` and ``data`` groups does (a new one joins the fingerprint by being declared there), and of a
#: LoRA warm start (``lora_rank`` > 0) every ``lora`` setting (``lora_export`` too: it decides what the
#: directory holds); evaluation, logging, checkpoint cadence and gradient checkpointing do not.
SHAPING_TOP = ("teacher", "teacher_dtype", "student", "seed")
#: A warm start's own files when its record does not list them (records before the list was kept).
_OWN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
    "value_head.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "run",
    WARM_START_FILE,
)
SHAPING_GROUPS = ("optim", "data")


def shaping_settings(config: TrainConfig) -> dict:
    """The settings of ``config`` that shape a warm start's weights, by flag name."""
    flat = config.flat()
    groups = SHAPING_GROUPS + (("lora",) if config.lora.rank > 0 else ())  # no LoRA: the fingerprints of before
    names = [flag for group, _, flag in config_leaves() if group in groups or flag in SHAPING_TOP]
    return {name: flat[name] for name in names}


def warm_start_fingerprint(config: TrainConfig, teacher) -> tuple[str, dict]:
    """(fingerprint, settings) of a warm start: the shaping settings, the teacher's weights hash, and
    the annotation cache's own fingerprint when ``data`` is a directory."""
    settings = shaping_settings(config)
    settings["agent"] = ":".join(WARM_START_AGENT)
    settings["teacher_weights"] = teacher.weights_fingerprint()
    data = Path(config.data.source)
    if config.data.source == "bundled":  # the bundled data's layout shapes it too (schema 3: float16 log-probs)
        settings["bundled_schema"] = SCHEMA
    elif (data / ANNOTATION_META).is_file():
        settings["data_fingerprint"] = read_json(data / ANNOTATION_META, "annotation metadata").get("fingerprint")
    student = Path(config.student)
    if student.is_dir():  # a student directory: its weights, not its name (it may be rewritten in place)
        weights = sorted(student.glob("*.safetensors"))
        settings["student_weights"] = hashlib.sha256(
            "".join(file_digest(w)["sha256"] for w in weights).encode()
        ).hexdigest()[:16]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return digest, settings


def warm_start(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    teacher=None,
    progress: bool = True,
    overwrite: bool = False,
    eval_every: int = 0,
) -> tuple[Path, dict]:
    """Train ``config.student`` with full-vocabulary KD for ``config.steps`` steps and export it to
    ``out`` (an ordinary HF model plus :data:`WARM_START_FILE`); returns ``(out, record)``, where the
    record holds the settings, the fingerprint, the training time, the last validation metrics and
    the validation history (every ``eval_every`` steps on ``config.eval_data`` / ``eval_split``, and at
    the end: evaluation does not shape the weights, so it is not in the fingerprint).
    A complete warm start with the same fingerprint in ``out`` is reused without training."""
    from tdrl.models import load_teacher
    from tdrl.training.build import build_trainer, resume_trainer
    from tdrl.training.checkpoints import find_checkpoint

    out = Path(out)
    teacher = teacher or load_teacher(
        config.teacher,
        dtype=config.teacher_dtype,
        device=resolve_device(config.device),
        device_map=config.teacher_device_map,
    )
    fingerprint, settings = warm_start_fingerprint(config, teacher)
    marker = out / WARM_START_FILE
    if marker.is_file():
        record = read_json(marker, "warm start record")
        if record.get("fingerprint") == fingerprint:
            return out, record
        if not overwrite:
            changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
            raise DataError(
                f"{out} holds a warm start made with other settings ({', '.join(changed)} differ): pass another "
                "--out, or --overwrite to replace it"
            )
        theirs = sorted(p.name for p in out.iterdir() if p.name not in set(record.get("files", _OWN_FILES)))
        if theirs:  # --overwrite replaces the warm start's own files, never what was put beside them
            raise DataError(
                f"{out} holds {', '.join(theirs)} beside its warm start: move them, or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):  # --overwrite replaces a warm start only
        raise DataError(
            f"{out} exists and is not a tdrl warm start: choose a new --out (--overwrite replaces a warm start)"
        )
    partial = out.parent / f".{out.name}.partial-{fingerprint}"
    name, args = WARM_START_AGENT
    steps = config.optim.steps
    run_config = config.replace(
        agent=name,
        agent_config=args,
        out=str(partial / "run"),
        eval_every=eval_every,
        test_prompts=0,
        checkpoint_every=min(config.checkpoint_every, steps),
        online_every=0,
        lm_coef=0.0,
    )
    try:
        find_checkpoint(partial / "run")
        trainer = resume_trainer(partial / "run", teacher=teacher, progress=progress)
    except CheckpointNotFoundError:
        trainer = build_trainer(run_config, teacher=teacher, progress=progress)
    summary = trainer.train()
    record = {
        "fingerprint": fingerprint,
        "settings": settings,
        "steps": summary.steps,
        "train_time_s": summary.train_time_s,
        "validation": dict(summary.last.metrics) if summary.last else {},
        "history": [e.to_dict() for e in summary.history],
    }
    with atomic_dir(out) as model_dir:
        trainer.student.save_pretrained(model_dir)
        for leftover in ("checkpoints", "best"):  # the model is exported; events and the summary stay
            shutil.rmtree(partial / "run" / leftover, ignore_errors=True)
        shutil.move(str(partial / "run"), str(model_dir / "run"))
        record["files"] = sorted([p.name for p in model_dir.iterdir()] + [WARM_START_FILE])
        (model_dir / WARM_START_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    shutil.rmtree(partial, ignore_errors=True)
    return out, record
