"""The arguments of a run: :class:`TrainConfig` plus the chosen agent's own typed settings.

``tdrl train --config run.yaml --agent iqlearn --expert-term topp_mean --lr 3e-4``: the file sets
defaults, flags override them. ``--agent`` is read first; the agent's Config dataclass then joins the
parser (``transformers.HfArgumentParser``), so ``tdrl train --agent bd --help`` lists bd's own fields
with their help, and they are type-checked like every other flag. ``--agent-args key=value,...`` and
an ``agent_args`` mapping in the file still work (a setting given twice is an error). Files are read
with ``yaml.safe_load`` / ``json``; unknown keys are an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tdrl.errors import ConfigError, check_field_types

__all__ = ["TrainConfig", "parse_agent_args", "load_config_file", "parse_train_args", "train_parser", "UNSET_DEFAULTS"]


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
    warmup_steps: int = _f(10, "linear warm-up steps (the paper: 100)")
    schedule: str = _f(
        "cosine", "learning-rate schedule after warm-up (transformers.get_scheduler): cosine, linear or constant"
    )
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    mixed_precision: str = _f(
        "no", "accelerate's mixed precision: no, bf16 (CPU or GPU), or fp16 (GPU, with loss scaling)"
    )
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
    eval_split: str = _f(
        "validation",
        "split of --eval-data (bundled: train, validation, test or heldout, or a slice of one such as "
        "'heldout[-64:]'; files have none)",
    )
    eval_prompts: int = _f(32, "prompts per evaluation (the first N of --eval-data)")
    eval_reference_column: str = _f("reference", "column of --eval-data / --test-data holding human references")
    test_data: str = _f("bundled", "test prompts, evaluated once at the end (last and best-validation model)")
    test_split: str = _f(
        "heldout",
        "split of --test-data (bundled: 'heldout', hand-written prompts no training template produced; 'test' "
        "shares the training templates; with other --test-data the default means the data's own split)",
    )
    test_prompts: int = _f(32, "test prompts (0: no test evaluation)")
    eval_max_new_tokens: int = _f(48, "response length limit at evaluation")
    eval_seeds: str = _f("0", "comma-separated sampling seeds of validation (and of the test, unless --test-seeds)")
    test_seeds: str = _f("", "comma-separated sampling seeds of the test (the paper: 5 seeds); empty: --eval-seeds")
    eval_top_p: float = _f(0.8, "student sampling nucleus at evaluation (the paper: 0.8; MiniLLM: 1.0)")
    eval_temperature: float = _f(1.0, "student sampling temperature at evaluation")
    eval_greedy: bool = _f(False, "greedy decoding at evaluation")
    eval_also_greedy: bool = _f(False, "also decode greedily at every validation (eval/rougeL_greedy); tests always do")
    metric_for_best_model: str = _f("eval/rougeL", "validation metric that selects best/ (any eval/* metric)")
    greater_is_better: bool = _f(True, "a larger --metric-for-best-model is better (False: e.g. eval/teacher_nll)")
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
    train_prompts: int = _f(256, "bundled data: training prompts to prepare (0: all 1,810)")
    response_tokens: int = _f(48, "bundled data: teacher response length")
    annotation_top_k: int = _f(64, "bundled data: candidate cap K of the annotation")
    annotation_top_p: float = _f(
        0.8,
        "bundled data: nucleus mass p the annotation marks (an agent's --top-p re-cuts it; --eval-top-p is decoding's)",
    )

    def __post_init__(self):
        from tdrl.actions import validate_top_k, validate_top_p
        from tdrl.data.sources import SPLITS, parse_split

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
            if data == "bundled" and parse_split(split)[0] not in SPLITS:
                raise ConfigError(
                    f"{name}_split of the bundled set must be one of {', '.join(SPLITS)}, or a slice of one "
                    f"('heldout[-64:]'), got {split!r}"
                )
        if self.test_prompts < 0:
            raise ConfigError(f"test_prompts must be >= 0, got {self.test_prompts}")
        check_device(self.device)
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError("mixed_precision fp16 needs a CUDA GPU (its loss scaling is CUDA's): use bf16 on the CPU")
        if not self.metric_for_best_model.startswith("eval/"):
            raise ConfigError(f"metric_for_best_model must be an eval/* metric, got {self.metric_for_best_model!r}")
        try:
            validate_top_p(self.annotation_top_p)
            validate_top_p(self.eval_top_p)
            validate_top_k(self.annotation_top_k)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.seed_list()
        self.test_seed_list()

    def seed_list(self) -> list[int]:
        return _seeds("eval_seeds", self.eval_seeds)

    def test_seed_list(self) -> list[int]:
        """The test's sampling seeds: ``test_seeds``, else ``eval_seeds``."""
        return _seeds("test_seeds", self.test_seeds) if str(self.test_seeds).strip() else self.seed_list()

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


def _seeds(name: str, text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"{name} must name at least one seed, got {text!r}")
    return seeds


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


def resolve_device(device: str) -> str:
    """The device this process computes on. ``cuda:N`` is made the current CUDA device (accelerate
    places models on the current one); under a multi-process launch (``LOCAL_RANK`` set by torchrun or
    ``accelerate launch``) a bare ``cuda`` is this process's own GPU, so N ranks do not all load their
    teacher onto GPU 0. Anything else is returned as given."""
    import os

    import torch

    target = torch.device(device)
    if target.type != "cuda":
        return device
    if target.index is None and int(os.environ.get("LOCAL_RANK", "-1")) >= 0:
        target = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if target.index is not None:
        torch.cuda.set_device(target.index)
    return str(target)


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
    """A YAML or JSON config file as a dict of settings (TrainConfig fields and agent fields;
    :func:`parse_train_args` sorts them and refuses unknown keys)."""
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
    return data


def train_parser(agent_config: type | None = None, prog: str | None = None):
    """The flags of TrainConfig, plus those of an agent's Config dataclass (``--expert-term`` ...)."""
    from transformers import HfArgumentParser

    if agent_config is not None:  # HfArgumentParser lists a dataclass with this attribute under its own heading
        agent_config = type(
            agent_config.__name__,
            (agent_config,),
            {"_argument_group_name": f"agent settings ({agent_config.__name__})"},
        )
    parser = HfArgumentParser((TrainConfig, agent_config) if agent_config else TrainConfig, prog=prog)
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (flags override it)")

    def error(message: str):  # a bad flag value is a ConfigError (one line from the CLI), not a usage dump
        raise ConfigError(f"{message} (see `{parser.prog} --help`)")

    parser.error = error
    return parser


def _given(argv: list[str], name: str) -> bool:
    flags = {f"--{name}", f"--{name.replace('_', '-')}", f"--no_{name}", f"--no-{name.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in flags for a in argv)


def parse_train_args(
    argv: list[str], defaults: dict[str, Any] | None = None, *, agent_flags: bool = True, prog: str = "tdrl train"
) -> tuple[TrainConfig, list[str]]:
    """Parse ``--config FILE``, TrainConfig flags and (``agent_flags``) the chosen agent's typed flags;
    return the config (agent settings merged into ``agent_args`` as JSON) and leftover arguments.
    ``defaults`` replace TrainConfig's own defaults (a command's presets); the file and flags win."""
    from tdrl.agents import get_agent

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--agent")
    known, _ = pre.parse_known_args(argv)
    file_values = load_config_file(known.config) if known.config else {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    agent_config = None
    if agent_flags:
        name = known.agent or file_values.get("agent") or (defaults or {}).get("agent") or TrainConfig.agent
        agent_config = get_agent(name).Config
    agent_fields = {f.name for f in dataclasses.fields(agent_config)} if agent_config else set()
    unknown = sorted(set(file_values) - train_fields - agent_fields)
    if unknown:
        raise ConfigError(f"{known.config}: unknown setting(s) {', '.join(unknown)}")
    parser = train_parser(agent_config, prog=prog)
    parser.set_defaults(**(defaults or {}), **file_values)
    ns, rest = parser.parse_known_args(argv)
    config = TrainConfig(**{name: getattr(ns, name) for name in train_fields})
    typed = {k: getattr(ns, k) for k in agent_fields if k in file_values or _given(argv, k)}
    if typed:
        merged = parse_agent_args(config.agent_args)
        twice = sorted(set(typed) & set(merged))
        if twice:
            raise ConfigError(f"agent setting(s) {', '.join(twice)} given both as flags and in agent_args: keep one")
        config.agent_args = json.dumps({**merged, **typed}, sort_keys=True)
    return config, rest
