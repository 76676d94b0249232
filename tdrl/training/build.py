"""From names to objects: :func:`build_trainer` resolves a :class:`~tdrl.training.config.TrainConfig`'s
teacher, student, agent, data and evaluation prompts into a :class:`~tdrl.training.trainer.Trainer`;
:func:`resume_trainer` rebuilds one from a run's newest intact checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from tdrl.agents import AgentConfig, get_agent, make_agent
from tdrl.data import DistillDataset, check_same_vocabulary, prepare_bundled_data
from tdrl.data.bundled import bundled_keep_top_p
from tdrl.errors import ConfigError, DataError
from tdrl.evaluation import reference_records
from tdrl.integrity import read_json
from tdrl.models import Teacher, load_student, load_teacher
from tdrl.training.callbacks import TrainerCallback
from tdrl.training.checkpoints import COMPLETE, CONFIG_FILE, find_checkpoint, run_directory
from tdrl.training.config import TrainConfig, resolve_device
from tdrl.training.resume import ResumePoint, refuse_newer_outputs
from tdrl.training.trainer import Trainer

__all__ = ["build_trainer", "resume_trainer", "set_seed", "check_rewards_fit_agent", "adapt_student"]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_rewards_fit_agent(settings: dict, config: AgentConfig) -> None:
    """The cached reward is derived at annotation time: with ``inverse_soft_q`` it is
    ``z(s, a) - gamma V(s')`` at the annotation's gamma, which goes stale under an agent that discounts
    with another gamma. Refuse that pairing (ConfigError naming both fixes)."""
    cached = settings.get("gamma")
    if settings.get("reward") == "inverse_soft_q" and cached is not None and cached != config.gamma:
        raise ConfigError(
            f"the annotation's rewards are inverse_soft_q, z(s, a) - gamma V(s') with gamma {cached}, but the agent "
            f"discounts with gamma {config.gamma}: pass --gamma {cached} or re-annotate with --gamma {config.gamma}"
        )


def adapt_student(student, args: TrainConfig):
    """The run's student as ``args`` makes it: LoRA adapters (``lora_rank`` > 0, :func:`~tdrl.models.lora.apply_lora`;
    an adapter export names the base by ``args.student``, a directory by its absolute path) and gradient
    checkpointing (``gradient_checkpointing``). Returns the student, changed in place."""
    from tdrl.models.lora import apply_lora

    lora = args.lora
    if lora.rank > 0:
        base = str(Path(args.student).resolve()) if Path(args.student).is_dir() else args.student
        apply_lora(
            student,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=lora.target_modules,
            export=lora.export,
            base=base,
        )
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


def build_trainer(
    args: TrainConfig,
    *,
    teacher: Teacher | None = None,
    callbacks: list[TrainerCallback] | None = None,
    progress: bool = True,
) -> Trainer:
    """Resolve the names of ``args`` (teacher, student, agent, data, validation and test prompts)
    into objects and return a :class:`Trainer`; ``teacher`` may be passed in to share it between runs."""
    args = args.resolve(get_agent(args.agent))  # an unknown agent fails before any model loads
    if args.lora.rank > 0:  # and a missing peft
        from tdrl.models.lora import require_peft

        require_peft()
    set_seed(args.seed)
    device = resolve_device(args.device)  # this process's GPU under torchrun / accelerate launch
    teacher = teacher or load_teacher(
        args.teacher, dtype=args.teacher_dtype, device=device, device_map=args.teacher_device_map
    )
    student = adapt_student(load_student(args.student, teacher=teacher), args).to(device)
    check_same_vocabulary(teacher.tokenizer, student.tokenizer)
    agent = make_agent(args.agent, student, args.agent_config, teacher=teacher).to(device)
    data, settings = args.data, args.eval
    # one process builds the cached data, the others read it
    with PartialState(cpu=torch.device(args.device).type == "cpu").main_process_first():
        if data.source == "bundled":
            data_dir = prepare_bundled_data(
                teacher,
                train_prompts=data.train_prompts,
                response_tokens=data.response_tokens,
                top_k=data.annotation_top_k,
                top_p=data.annotation_top_p,
                keep_top_p=bundled_keep_top_p(data, agent.config),
                progress=progress,
            )
        elif not Path(data.source).exists():
            raise DataError(
                f"data directory {data.source} does not exist: build it with `tdrl annotate` or use --data bundled"
            )
        else:
            data_dir = data.source
        dataset = DistillDataset(data_dir, tokenizer=student.tokenizer, top_p=agent.config.top_p)
        check_rewards_fit_agent(dataset.meta.get("settings", {}), agent.config)
        made_by = dataset.meta.get("settings", {}).get("weights")
        if made_by not in (None, teacher.weights_fingerprint()):
            raise DataError(
                f"the annotation cache {data_dir} was made by another teacher (weights {made_by}, this teacher "
                f"{teacher.weights_fingerprint()}): annotate the data with this teacher"
            )
        references = dict(max_new_tokens=settings.max_new_tokens, reference_column=settings.reference_column)
        eval_records = reference_records(teacher, settings.data, split=settings.split, n=settings.prompts, **references)
        test_records = None
        if args.test.prompts:
            test = args.test
            test_records = reference_records(teacher, test.data, split=test.split_name, n=test.prompts, **references)
    return Trainer(
        agent, teacher, dataset, eval_records, args, test_records=test_records, callbacks=callbacks, progress=progress
    )


def resume_trainer(
    path: str | Path,
    *,
    teacher: Teacher | None = None,
    callbacks: list[TrainerCallback] | None = None,
    progress: bool = True,
    steps: int | None = None,
    overwrite: bool = False,
) -> Trainer:
    """A trainer restored from the newest intact checkpoint under ``path`` (or ``path`` itself),
    writing to the run directory ``path`` names (not the one stored in the checkpoint: a copied run
    resumes in its copy). Every checkpoint file is verified against the manifest first, and the
    data cache, the teacher and the validation and test records must be the ones the run started
    with. ``steps`` may extend the run. A checkpoint named while the run directory holds checkpoints
    (or a ``best/``) newer than it is refused before anything loads, unless ``overwrite``: then those
    are deleted when the run starts (:func:`~tdrl.training.resume.refuse_newer_outputs`)."""
    path = Path(path)
    if (path / COMPLETE).is_file() and path.parent.name != "checkpoints":
        raise ConfigError(
            f"{path} is a checkpoint outside its run directory: resume the run (the directory holding "
            "checkpoints/), or copy the whole run directory and resume the copy"
        )
    checkpoint, explicit = find_checkpoint(path, verify=True), (path / COMPLETE).is_file()
    step = read_json(checkpoint / COMPLETE, "checkpoint marker")["step"]
    refuse_newer_outputs(run_directory(path), ResumePoint(step, explicit=explicit, discard_newer=overwrite))
    args = TrainConfig.from_dict(read_json(checkpoint / CONFIG_FILE, "checkpoint config"))
    args = args.replace(out=str(run_directory(path)), **({"steps": steps} if steps is not None else {}))
    trainer = build_trainer(args, teacher=teacher, callbacks=callbacks, progress=progress)
    trainer.load_checkpoint(checkpoint, explicit=explicit, discard_newer=overwrite)
    return trainer
