"""The groups of a :class:`~tdrl.training.config.TrainConfig`, one dataclass each: optimisation,
the training data, validation and decoding, the test, online collection, J_PT, and LoRA. Every field has its
``--help`` text, its valid values (``range=`` / ``choices=``, checked when the group is built, errors
naming the flag: ``--eval-top-p must lie in (0, 1], got 2``) and a flag name unique over the whole
config (the group's ``PREFIX`` + the field's name, or its own ``flag``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tdrl.agents.config import hp as setting
from tdrl.errors import SEED_RANGE, ConfigError, check_config, check_seeds

__all__ = [
    "OptimConfig",
    "DataConfig",
    "EvalSettings",
    "TestSettings",
    "OnlineConfig",
    "LMConfig",
    "LoraSettings",
    "setting",
    "flag_name",
    "flag_of",
    "check_group",
    "seed_list",
]


def flag_name(group: type, name: str) -> str:
    """The flag name of field ``name`` of a config dataclass (``--eval-every`` is ``eval_every``)."""
    f = group.__dataclass_fields__[name]
    return f.metadata.get("flag") or f"{group.PREFIX}{name}"


def flag_of(group: type, name: str) -> str:
    """Field ``name`` of a group as the command line writes it (``--eval-every``): what its errors name."""
    return "--" + flag_name(group, name).replace("_", "-")


def check_group(instance) -> None:
    """The type and range checks of every field of a group (or of TrainConfig), named by its flag."""
    check_config(instance, lambda name: flag_of(type(instance), name))


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


@dataclass
class OptimConfig:
    """Optimisation: AdamW, warm-up then a schedule, clipping, mixed precision, accumulation."""

    PREFIX: ClassVar[str] = ""
    steps: int = setting(200, "optimiser steps", range=">= 1")
    batch_size: int = setting(8, "sequences per micro-batch", range=">= 1")
    grad_accum: int = setting(1, "micro-batches per optimiser step", range=">= 1")
    lr: float = setting(1e-4, "peak learning rate (the paper: 5e-6 for full-size students)", range=">= 0")
    weight_decay: float = setting(0.0, "AdamW weight decay", range=">= 0")
    adam_beta1: float = setting(0.9, "AdamW beta1 (the paper: 0.9)", range="[0, 1)")
    adam_beta2: float = setting(0.95, "AdamW beta2 (the paper: 0.95)", range="[0, 1)")
    warmup_steps: int = setting(10, "linear warm-up steps (the paper: 100)", range=">= 0")
    schedule: str = setting(
        "cosine",
        "learning-rate schedule after warm-up (transformers.get_scheduler): cosine, linear or constant",
        choices=("cosine", "linear", "constant"),
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: off)", range=">= 0")
    mixed_precision: str = setting(
        "no",
        "accelerate's mixed precision: no, bf16 (CPU or GPU), or fp16 (GPU, with loss scaling)",
        choices=("no", "bf16", "fp16"),
    )

    def __post_init__(self):
        check_group(self)


@dataclass
class DataConfig:
    """The training data: an annotation cache, or the bundled prompts annotated on first use."""

    PREFIX: ClassVar[str] = ""
    source: str = setting(
        "bundled", "annotation cache directory, or 'bundled' to build one from the bundled prompts", flag="data"
    )
    train_prompts: int = setting(256, "bundled data: training prompts to prepare (0: all 1,810)", range=">= 0")
    response_tokens: int = setting(48, "bundled data: teacher response length", range=">= 1")
    annotation_top_k: int = setting(64, "bundled data: candidate cap K of the annotation", range=">= 1")
    annotation_top_p: float = setting(
        0.8,
        "bundled data: nucleus mass p the annotation marks (an agent's --top-p re-cuts it; --eval-top-p is decoding's)",
        range="(0, 1]",
    )
    annotation_keep_top_p: float | None = setting(
        None,
        "bundled data: the cache keeps each state's candidates up to this teacher mass, the largest p an agent's "
        "--top-p can re-cut at, never less than --annotation-top-p (default: 0.9, or the agent's --top-p if larger; "
        "1.0: the whole top-K)",
        range="(0, 1]",
    )

    def __post_init__(self):
        check_group(self)


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
    every: int = setting(50, "evaluate every N steps (and at the end); 0: only at the end", range=">= 0")
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
    prompts: int = setting(32, "prompts per evaluation (the first N of --eval-data)", range=">= 1")
    reference_column: str = setting("reference", "column of --eval-data / --test-data holding human references")
    max_new_tokens: int = setting(48, "response length limit at evaluation", range=">= 1")
    seeds: list[int] = setting(
        None,
        "sampling seeds of validation (and of the test, unless --test-seeds); at least one, none twice",
        factory=lambda: [0],
        range=SEED_RANGE,
    )
    top_p: float = setting(0.8, "student sampling nucleus at evaluation (the paper: 0.8; MiniLLM: 1.0)", range="(0, 1]")
    temperature: float = setting(
        1.0, "student sampling temperature at evaluation", range="> 0", why="use --eval-greedy for greedy"
    )
    greedy: bool = setting(False, "greedy decoding at evaluation")
    also_greedy: bool = setting(False, "also decode greedily at every validation (eval/rougeL_greedy); tests always do")
    metric_for_best_model: str = setting(
        "eval/rougeL", "validation metric that selects best/ (any eval/* metric)", flag="metric_for_best_model"
    )
    greater_is_better: bool = setting(
        True, "a larger --metric-for-best-model is better (False: e.g. eval/teacher_nll)", flag="greater_is_better"
    )

    def __post_init__(self):
        self.seeds = seed_list("--eval-seeds", self.seeds)
        check_group(self)
        _check_bundled_split("--eval-split", self.data, self.split)
        check_seeds("--eval-seeds", self.seeds)
        if not self.metric_for_best_model.startswith("eval/"):
            raise ConfigError(f"--metric-for-best-model must be an eval/* metric, got {self.metric_for_best_model!r}")
        from tdrl.evaluation import METRICS

        names = [m.name for m in METRICS]
        if self.metric_for_best_model.removesuffix("_std") not in names:
            raise ConfigError(
                f"--metric-for-best-model {self.metric_for_best_model!r} is not an evaluation metric: choose one of "
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
    prompts: int = setting(32, "test prompts (0: no test evaluation)", range=">= 0")
    seeds: list[int] | None = setting(
        None,
        "sampling seeds of the test (the paper: 5 seeds); default: --eval-seeds; at least one, none twice",
        range=SEED_RANGE,
    )

    def __post_init__(self):
        if isinstance(self.seeds, str) and not self.seeds.strip():
            self.seeds = None  # tdrl 0.1 wrote "" for "the validation's seeds"
        self.seeds = seed_list("--test-seeds", self.seeds)
        check_group(self)
        _check_bundled_split("--test-split", self.data, self.split_name)
        if self.seeds is not None:
            check_seeds("--test-seeds", self.seeds, " (omit it to use --eval-seeds)")

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
        range=">= 0",
    )
    ratio: float | None = setting(
        None,
        "fraction of each batch taken from the latest student episodes when online (default: the agent's "
        "preset: minillm 1.0, gkd 0.5 (GKD's lambda), else 0.5)",
        range="[0, 1]",
    )
    episodes: int = setting(16, "student episodes per collection", range=">= 1")
    envs: int = setting(8, "sub-environments of the vector env used for collection", range=">= 1")
    max_new_tokens: int = setting(32, "response length limit of collected episodes", range=">= 1")

    def __post_init__(self):
        check_group(self)


@dataclass
class LMConfig:
    """MiniLLM's pre-training term J_PT on a plain-text corpus (an auxiliary loss the trainer adds)."""

    PREFIX: ClassVar[str] = "lm_"
    coef: float | None = setting(
        None,
        "weight of the auxiliary LM loss J_PT (MiniLLM's: 0.5 next-token NLL + 0.5 KD); 0: off (default: the "
        "agent's preset: bd 1.0, others 0)",
        range=">= 0",
    )
    corpus: str = setting("pydoc", "plain-text corpus of J_PT: 'pydoc' (the stdlib's pydoc_data text) or a .txt file")
    seq_len: int = setting(64, "tokens per J_PT sequence", range=">= 1")
    batch_size: int = setting(4, "J_PT sequences per step", range=">= 1")

    def __post_init__(self):
        check_group(self)


@dataclass
class LoraSettings:
    """LoRA adapters on the student (peft, `pip install tdrl[lora]`): only they and the agents' heads train."""

    PREFIX: ClassVar[str] = "lora_"
    rank: int = setting(
        0, "rank r of LoRA adapters on the student (needs peft: pip install tdrl[lora]); 0: none", range=">= 0"
    )
    alpha: float = setting(16.0, "LoRA alpha: each adapted weight computes W + (alpha / r) B A", range="> 0")
    dropout: float = setting(
        0.0, "dropout on the inputs of the adapters (0 when the LM head is among --lora-target-modules)", range="[0, 1)"
    )
    target_modules: str = setting(
        "all-linear",
        "layers that get adapters: all-linear (every linear layer but the LM head) or comma-separated module names, "
        "e.g. q_proj,v_proj or c_attn,c_proj,c_fc,lm_head (lm_head: the output embedding, tied or not)",
    )
    export: str = setting(
        "merged",
        "what best/, a checkpoint's student/ and a warm start hold: merged (a plain HF model, the adapters folded in) "
        "or adapter (peft's adapter files; the base is named in adapter_config.json)",
        choices=("merged", "adapter"),
    )

    def __post_init__(self):
        check_group(self)
        from tdrl.models.lora import parse_target_modules

        parse_target_modules(self.target_modules)
