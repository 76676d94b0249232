"""The groups of a :class:`~tdrl.training.config.TrainConfig`, one dataclass each: optimisation,
the training data, validation and decoding, the test, online collection, and J_PT. Every field has its
``--help`` text and a flag name unique over the whole config (the group's ``PREFIX`` + the field's
name, or its own ``flag``); each group checks its own ranges when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tdrl.agents.config import hp as setting
from tdrl.errors import ConfigError, check_field_types

__all__ = [
    "OptimConfig",
    "DataConfig",
    "EvalSettings",
    "TestSettings",
    "OnlineConfig",
    "LMConfig",
    "setting",
    "flag_name",
    "at_least",
    "seed_list",
]


def at_least(instance, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(instance, name) < minimum:
            raise ConfigError(f"{flag_name(type(instance), name)} must be >= {minimum}, got {getattr(instance, name)}")


def flag_name(group: type, name: str) -> str:
    """The flag name of field ``name`` of a config dataclass (``--eval-every`` is ``eval_every``)."""
    f = group.__dataclass_fields__[name]
    return f.metadata.get("flag") or f"{group.PREFIX}{name}"


def _check_types(instance) -> None:
    check_field_types(instance, lambda name: flag_name(type(instance), name))


def seed_list(name: str, value) -> list[int] | None:
    """Seeds from a list, one integer, or a comma-separated string (``"0,1,2"``, YAML's and tdrl 0.1's)."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        try:
            return [int(s) for s in value.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"{name} must be integers, got {value!r}") from None
    raise ConfigError(f"{name} must be a list of integers, got {value!r}")


def _check_top_p(name: str, value: float) -> None:
    from tdrl.actions import validate_top_p

    try:
        validate_top_p(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _check_seeds(name: str, seeds) -> None:
    if not seeds:
        omit = " (omit it to use --eval-seeds)" if name == "test_seeds" else ""
        raise ConfigError(f"{name} must name at least one seed{omit}")
    if any(not 0 <= seed < 2**31 for seed in seeds):
        raise ConfigError(f"{name} must lie in [0, 2**31), got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{name} repeats a seed ({seeds}): repeated seeds are not independent samples")


@dataclass
class OptimConfig:
    """Optimisation: AdamW, warm-up then a schedule, clipping, mixed precision, accumulation."""

    PREFIX: ClassVar[str] = ""
    steps: int = setting(200, "optimiser steps")
    batch_size: int = setting(8, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimiser step")
    lr: float = setting(1e-4, "peak learning rate (the paper: 5e-6 for full-size students)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "AdamW beta1 (the paper: 0.9)")
    adam_beta2: float = setting(0.95, "AdamW beta2 (the paper: 0.95)")
    warmup_steps: int = setting(10, "linear warm-up steps (the paper: 100)")
    schedule: str = setting(
        "cosine", "learning-rate schedule after warm-up (transformers.get_scheduler): cosine, linear or constant"
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: off)")
    mixed_precision: str = setting(
        "no", "accelerate's mixed precision: no, bf16 (CPU or GPU), or fp16 (GPU, with loss scaling)"
    )

    def __post_init__(self):
        _check_types(self)
        at_least(self, 1, "steps", "batch_size", "grad_accum")
        at_least(self, 0, "warmup_steps")
        at_least(self, 0, "lr", "weight_decay", "max_grad_norm")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclass
class DataConfig:
    """The training data: an annotation cache, or the bundled prompts annotated on first use."""

    PREFIX: ClassVar[str] = ""
    source: str = setting(
        "bundled", "annotation cache directory, or 'bundled' to build one from the bundled prompts", flag="data"
    )
    train_prompts: int = setting(256, "bundled data: training prompts to prepare (0: all 1,810)")
    response_tokens: int = setting(48, "bundled data: teacher response length")
    annotation_top_k: int = setting(64, "bundled data: candidate cap K of the annotation")
    annotation_top_p: float = setting(
        0.8,
        "bundled data: nucleus mass p the annotation marks (an agent's --top-p re-cuts it; --eval-top-p is decoding's)",
    )
    annotation_keep_top_p: float | None = setting(
        None,
        "bundled data: the cache keeps each state's candidates up to this teacher mass, the largest p an agent's "
        "--top-p can re-cut at (default: 0.95, or the agent's --top-p if larger; 1.0: the whole top-K)",
    )

    def __post_init__(self):
        from tdrl.actions import validate_top_k

        _check_types(self)
        at_least(self, 1, "response_tokens")
        at_least(self, 0, "train_prompts")
        _check_top_p("annotation_top_p", self.annotation_top_p)
        if self.annotation_keep_top_p is not None:
            from tdrl.data.layout import check_keep_top_p

            try:
                check_keep_top_p(self.annotation_keep_top_p, self.annotation_top_p)
            except ConfigError as exc:
                raise ConfigError(f"annotation_{exc}") from None
        try:
            validate_top_k(self.annotation_top_k)
        except ValueError as exc:
            raise ConfigError(f"annotation_top_k: {exc}") from None


def _check_bundled_split(name: str, data: str, split: str) -> None:
    from tdrl.data.sources import SPLITS, parse_split

    if data == "bundled" and parse_split(split)[0] not in SPLITS:
        raise ConfigError(
            f"{name} of the bundled set must be one of {', '.join(SPLITS)}, or a slice of one ('heldout[-64:]'), "
            f"got {split!r}"
        )


@dataclass
class EvalSettings:
    """Validation (model selection) and the decoding protocol of every evaluation, the test's too."""

    PREFIX: ClassVar[str] = "eval_"
    every: int = setting(50, "evaluate every N steps (and at the end); 0: only at the end")
    on_start: bool = setting(True, "with --eval-every > 0, also evaluate the starting student (step 0)")
    data: str = setting(
        "bundled",
        "validation prompts (model selection): 'bundled', 'dolly', a .jsonl/.json/.csv file or HF data "
        "set with a prompt column and an optional reference column (human references: eval/rougeL_reference)",
    )
    split: str = setting(
        "validation",
        "split of --eval-data (bundled: train, validation, test or heldout, or a slice of one such as "
        "'heldout[-64:]'; files have none)",
    )
    prompts: int = setting(32, "prompts per evaluation (the first N of --eval-data)")
    reference_column: str = setting("reference", "column of --eval-data / --test-data holding human references")
    max_new_tokens: int = setting(48, "response length limit at evaluation")
    seeds: list[int] = setting(
        None, "sampling seeds of validation (and of the test, unless --test-seeds)", factory=lambda: [0]
    )
    top_p: float = setting(0.8, "student sampling nucleus at evaluation (the paper: 0.8; MiniLLM: 1.0)")
    temperature: float = setting(1.0, "student sampling temperature at evaluation")
    greedy: bool = setting(False, "greedy decoding at evaluation")
    also_greedy: bool = setting(False, "also decode greedily at every validation (eval/rougeL_greedy); tests always do")
    metric_for_best_model: str = setting(
        "eval/rougeL", "validation metric that selects best/ (any eval/* metric)", flag="metric_for_best_model"
    )
    greater_is_better: bool = setting(
        True, "a larger --metric-for-best-model is better (False: e.g. eval/teacher_nll)", flag="greater_is_better"
    )

    def __post_init__(self):
        self.seeds = seed_list("eval_seeds", self.seeds)
        _check_types(self)
        at_least(self, 0, "every")
        at_least(self, 1, "prompts", "max_new_tokens")
        _check_bundled_split("eval_split", self.data, self.split)
        _check_seeds("eval_seeds", self.seeds)
        _check_top_p("eval_top_p", self.top_p)
        if not self.temperature > 0:
            raise ConfigError(f"eval_temperature must be > 0 (use --eval-greedy for greedy), got {self.temperature}")
        if not self.metric_for_best_model.startswith("eval/"):
            raise ConfigError(f"metric_for_best_model must be an eval/* metric, got {self.metric_for_best_model!r}")
        from tdrl.evaluation import METRICS

        names = [m.name for m in METRICS]
        if self.metric_for_best_model.removesuffix("_std") not in names:
            raise ConfigError(
                f"metric_for_best_model {self.metric_for_best_model!r} is not an evaluation metric: choose one of "
                f"{', '.join(names)} (tdrl.evaluation.METRICS)"
            )

    def protocol(self, seeds: list[int] | None = None, also_greedy: bool | None = None):
        """The evaluation's :class:`~tdrl.evaluation.EvalConfig` (decoding and scoring) of these
        settings; ``seeds`` / ``also_greedy`` replace the validation's (the test passes its own)."""
        from tdrl.evaluation import EvalConfig

        return EvalConfig(
            max_new_tokens=self.max_new_tokens,
            seeds=list(seeds if seeds is not None else self.seeds),
            top_p=self.top_p,
            temperature=self.temperature,
            greedy=self.greedy,
            also_greedy=self.also_greedy if also_greedy is None else also_greedy,
        )


@dataclass
class TestSettings:
    """The test: scored once at the end, the last and the best-validation model, with the evaluation's
    decoding protocol (:class:`EvalSettings`) and its own sampling seeds."""

    PREFIX: ClassVar[str] = "test_"
    data: str = setting("bundled", "test prompts, evaluated once at the end (last and best-validation model)")
    split: str | None = setting(
        None,
        "split of --test-data (default: 'heldout' for the bundled set, hand-written prompts no training template "
        "produced ('test' shares the training templates); other data: its own default split)",
    )
    prompts: int = setting(32, "test prompts (0: no test evaluation)")
    seeds: list[int] | None = setting(None, "sampling seeds of the test (the paper: 5 seeds); default: --eval-seeds")

    def __post_init__(self):
        if isinstance(self.seeds, str) and not self.seeds.strip():
            self.seeds = None  # tdrl 0.1 wrote "" for "the validation's seeds"
        self.seeds = seed_list("test_seeds", self.seeds)
        _check_types(self)
        at_least(self, 0, "prompts")
        _check_bundled_split("test_split", self.data, self.split_name)
        if self.seeds is not None:
            _check_seeds("test_seeds", self.seeds)

    @property
    def split_name(self) -> str | None:
        """The split read: the given one, else ``heldout`` for the bundled set (other data: their own)."""
        return self.split if self.split is not None else "heldout" if self.data == "bundled" else None


@dataclass
class OnlineConfig:
    """The student's own episodes, collected through the vector env during training (GKD, MiniLLM)."""

    PREFIX: ClassVar[str] = "online_"
    every: int | None = setting(
        None,
        "collect student episodes through the env every N steps (0: offline only; default: the agent's "
        "preset: minillm and gkd 10, others 0)",
    )
    ratio: float | None = setting(
        None,
        "fraction of each batch taken from the latest student episodes when online (default: the agent's "
        "preset: minillm 1.0, gkd 0.5 (GKD's lambda), else 0.5)",
    )
    episodes: int = setting(16, "student episodes per collection")
    envs: int = setting(8, "sub-environments of the vector env used for collection")
    max_new_tokens: int = setting(32, "response length limit of collected episodes")

    def __post_init__(self):
        _check_types(self)
        at_least(self, 1, "episodes", "envs", "max_new_tokens")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"online_ratio must lie in [0, 1], got {self.ratio}")
        if self.every is not None and self.every < 0:
            raise ConfigError(f"online_every must be >= 0, got {self.every}")


@dataclass
class LMConfig:
    """MiniLLM's pre-training term J_PT on a plain-text corpus (an auxiliary loss the trainer adds)."""

    PREFIX: ClassVar[str] = "lm_"
    coef: float | None = setting(
        None,
        "weight of the auxiliary LM loss J_PT (MiniLLM's: 0.5 next-token NLL + 0.5 KD); 0: off (default: the "
        "agent's preset: bd 1.0, others 0)",
    )
    corpus: str = setting("pydoc", "plain-text corpus of J_PT: 'pydoc' (the stdlib's pydoc_data text) or a .txt file")
    seq_len: int = setting(64, "tokens per J_PT sequence")
    batch_size: int = setting(4, "J_PT sequences per step")

    def __post_init__(self):
        _check_types(self)
        at_least(self, 1, "seq_len", "batch_size")
        if self.coef is not None and not self.coef >= 0:
            raise ConfigError(f"lm_coef must be >= 0, got {self.coef}")
