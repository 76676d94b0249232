"""Configuration: dataclasses in, YAML/JSON files and command-line overrides on top.

``tdrl train --config run.yaml --agent iql --lr 3e-4``: the file sets defaults, flags override them
(``transformers.HfArgumentParser`` builds the flags, with each field's ``help``). Files are read with
``yaml.safe_load`` / ``json``; unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tdrl.errors import ConfigError

__all__ = ["TrainConfig", "parse_agent_args", "load_config_file", "parse_train_args", "check_field_types"]


def check_field_types(instance) -> None:
    """Each field of a dataclass instance has its annotated type (ints given for floats become floats;
    None only where the annotation allows it); else :class:`~tdrl.errors.ConfigError` naming the field.
    YAML, JSON and ``key=value`` strings reach the configs untyped: this is where ``steps: null`` or
    ``alpha=abc`` is caught, before any arithmetic on it."""
    import types
    import typing

    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        hint, value = hints[f.name], getattr(instance, f.name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed = tuple(a for a in allowed if isinstance(a, type))
        if value is None and type(None) in allowed:
            continue
        if allowed == (str,) and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(instance, f.name, str(value))  # YAML reads `eval_seeds: 0` as a number
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(instance, f.name, float(value))
            continue
        if bool not in allowed and isinstance(value, bool) and (int in allowed or float in allowed):
            raise ConfigError(f"{f.name} must be a number, got {value!r}")
        if not isinstance(value, allowed):
            names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
            raise ConfigError(f"{f.name} must be {names}, got {value!r}")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """One training run: agent, models, data, optimisation, evaluation, checkpoints."""

    agent: str = _f("bd", "agent name (see `tdrl agents`)")
    agent_args: str = _f("", "agent settings as key=value pairs separated by commas, or a JSON object")
    teacher: str = _f("bundled", "teacher: bundled, tiny, a local directory or a hub id")
    student: str = _f("layers:0,10,20,29", "student: tiny, layers:i,j,... (from the teacher), a directory or hub id")
    data: str = _f("bundled", "annotation cache directory, or 'bundled' to build one from the bundled prompts")
    out: str = _f("runs/tdrl", "run directory (checkpoints, TensorBoard events, summary.json)")
    seed: int = _f(0, "seed of initialisation, data order and sampling")
    steps: int = _f(200, "optimiser steps")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimiser step")
    lr: float = _f(1e-4, "peak learning rate (the paper: 5e-6 for full-size students)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1 (the paper: 0.9)")
    adam_beta2: float = _f(0.95, "AdamW beta2 (the paper: 0.95)")
    warmup_steps: int = _f(10, "linear warm-up steps, at most 10% of --steps (the paper: 100)")
    schedule: str = _f("cosine", "learning-rate schedule after warm-up: cosine, linear or constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    precision: str = _f("fp32", "fp32, or bf16 / fp16 autocast where the device supports it")
    device: str = _f("cpu", "torch device of student and teacher")
    overwrite: bool = _f(False, "replace a run already in --out (else a second run into it is refused)")
    teacher_dtype: str = _f("float32", "teacher dtype: float32, bfloat16 or float16")
    log_every: int = _f(10, "log training scalars every N steps")
    eval_every: int = _f(50, "evaluate every N steps (and at the end); 0: only at the end")
    eval_data: str = _f(
        "bundled",
        "validation prompts (model selection): 'bundled', 'dolly', a .jsonl/.json/.csv file or HF data "
        "set with a prompt column and an optional reference column (human references: eval/rougeL_reference)",
    )
    eval_split: str = _f("validation", "split of --eval-data (bundled: validation or test; files have none)")
    eval_prompts: int = _f(32, "prompts per evaluation (the first N of --eval-data)")
    eval_reference_column: str = _f("reference", "column of --eval-data / --test-data holding human references")
    test_data: str = _f("bundled", "test prompts, evaluated once at the end (last and best-validation model)")
    test_split: str = _f("test", "split of --test-data")
    test_prompts: int = _f(32, "test prompts (0: no test evaluation)")
    eval_max_new_tokens: int = _f(48, "response length limit at evaluation")
    eval_seeds: str = _f("0", "comma-separated sampling seeds (the paper: 5 seeds)")
    eval_top_p: float = _f(0.8, "student sampling nucleus at evaluation (the paper: 0.8; MiniLLM: 1.0)")
    eval_temperature: float = _f(1.0, "student sampling temperature at evaluation")
    eval_greedy: bool = _f(False, "greedy decoding at evaluation")
    checkpoint_every: int = _f(50, "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)")
    keep_last: int = _f(2, "checkpoints to keep (the best one is kept apart in best/)")
    online_every: int | None = _f(
        None,
        "collect student episodes through the env every N steps (0: offline only; default: the agent's "
        "preset: minillm and gkd 10, others 0)",
    )
    online_ratio: float | None = _f(
        None,
        "fraction of each batch taken from the latest student episodes when online (default: the agent's "
        "preset: minillm 1.0, gkd 0.5 (GKD's lambda), else 0.5)",
    )
    online_episodes: int = _f(16, "student episodes per collection")
    online_envs: int = _f(8, "sub-environments of the vector env used for collection")
    online_max_new_tokens: int = _f(32, "response length limit of collected episodes")
    lm_coef: float | None = _f(
        None,
        "weight of the auxiliary LM loss J_PT (MiniLLM's: 0.5 next-token NLL + 0.5 KD); 0: off (default: the "
        "agent's preset: bd 1.0, others 0)",
    )
    lm_corpus: str = _f("pydoc", "plain-text corpus of J_PT: 'pydoc' (the stdlib's pydoc_data text) or a .txt file")
    lm_seq_len: int = _f(64, "tokens per J_PT sequence")
    lm_batch_size: int = _f(4, "J_PT sequences per step")
    train_prompts: int = _f(256, "bundled data: training prompts to prepare (0: all 1,732)")
    response_tokens: int = _f(48, "bundled data: teacher response length")
    top_k: int = _f(64, "bundled data: candidate cap K of the annotation")
    top_p: float = _f(0.8, "bundled data: nucleus mass p of the annotation")

    def __post_init__(self):
        from tdrl.actions import validate_top_k, validate_top_p

        check_field_types(self)
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "eval_prompts",
            "eval_max_new_tokens",
            "keep_last",
            "response_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.online_ratio is not None and not 0.0 <= self.online_ratio <= 1.0:
            raise ConfigError(f"online_ratio must lie in [0, 1], got {self.online_ratio}")
        if self.online_every is not None and self.online_every < 0:
            raise ConfigError(f"online_every must be >= 0, got {self.online_every}")
        if self.lm_coef is not None and self.lm_coef < 0:
            raise ConfigError(f"lm_coef must be >= 0, got {self.lm_coef}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        for name, data, split in (("eval", self.eval_data, self.eval_split), ("test", self.test_data, self.test_split)):
            if data == "bundled" and split not in ("train", "validation", "test"):
                raise ConfigError(f"{name}_split of the bundled set must be train, validation or test, got {split!r}")
        if self.test_prompts < 0:
            raise ConfigError(f"test_prompts must be >= 0, got {self.test_prompts}")
        check_device(self.device)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        try:
            validate_top_p(self.top_p)
            validate_top_p(self.eval_top_p)
            validate_top_k(self.top_k)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.seed_list()

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in str(self.eval_seeds).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"eval_seeds must be comma-separated integers, got {self.eval_seeds!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_agent_defaults(self, trainer_defaults: dict[str, Any]) -> TrainConfig:
        """A copy whose unset (None) fields take the agent's preset (``Agent.trainer_defaults``), then
        the library's defaults (:data:`UNSET_DEFAULTS`); fields the user set are kept."""
        values = {}
        for name, default in UNSET_DEFAULTS.items():
            if getattr(self, name) is None:
                values[name] = trainer_defaults.get(name, default)
        return dataclasses.replace(self, **values)


#: What an unset trainer field means when the agent has no preset for it.
UNSET_DEFAULTS: dict[str, Any] = {"online_every": 0, "online_ratio": 0.5, "lm_coef": 0.0}


def check_device(device: str) -> None:
    """A torch device this machine has: ``cuda`` needs a GPU, ``mps`` Apple's backend."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but this machine has no CUDA GPU: use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was asked for but MPS is not available here: use --device cpu")


def parse_agent_args(text: str) -> dict[str, Any]:
    """``"alpha=0.1,chi2=false"`` or ``'{"alpha": 0.1}'`` -> a dict (values parsed as YAML scalars)."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"agent_args is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError("agent_args JSON must be an object")
        return value
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"agent_args entry {part!r} is not key=value")
        key, raw = part.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw.strip())
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a dict of TrainConfig fields (unknown keys raise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    if isinstance(data.get("agent_args"), dict):
        data["agent_args"] = json.dumps(data["agent_args"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def parse_train_args(argv: list[str], defaults: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """Parse ``--config FILE`` plus TrainConfig flags; return the config and leftover arguments.
    ``defaults`` replace TrainConfig's own defaults (a command's presets); the file and flags win."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig)
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (flags override it)")
    if defaults:
        parser.set_defaults(**defaults)
    known, rest = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    ns, rest = parser.parse_known_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values), rest
