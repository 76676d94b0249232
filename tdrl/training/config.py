"""The settings of a run: :class:`TrainConfig`, a few nested groups, and the chosen agent's own Config.

::

    TrainConfig(agent="bd", agent_config=IQLearnConfig(alpha=0.1), student="layers:0,10,20,29",
                optim=OptimConfig(steps=200, lr=1e-4), eval=EvalSettings(every=50, seeds=[0, 1]))

Each group is a dataclass: :class:`OptimConfig` (optimisation), :class:`DataConfig` (the training
data), :class:`EvalSettings` (validation, decoding and model selection), :class:`TestSettings`
(the test run at the end), :class:`OnlineConfig` (the student's own episodes), :class:`LMConfig`
(MiniLLM's pre-training term J_PT) and :class:`LoraSettings` (LoRA adapters on the student). The
agent's settings are an instance of that agent's Config (``agent_config``) from the YAML file or the
command line to the checkpoint and the HParams tab.

Every leaf has one **flag name**, unique over the whole config: the command line's ``--eval-every``,
a flat YAML key ``eval_every:`` and :meth:`TrainConfig.replace` (``config.replace(eval_every=0)``)
all use it; :meth:`TrainConfig.to_dict` writes the nested form, :meth:`TrainConfig.from_dict` reads
either (and the flat files of tdrl 0.1, ``agent_args`` string included).

Three settings default to the agent's preset (``None``: ``online_every``, ``online_ratio``,
``lm_coef``; :attr:`~tdrl.agents.Agent.trainer_defaults`): :meth:`TrainConfig.resolve` fills them and
the agent's Config once, before a run; the device is checked when the run starts
(:func:`~tdrl.training.devices.check_device`, re-exported here), not when the config is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tdrl.errors import ConfigError
from tdrl.training.devices import check_device, resolve_device
from tdrl.training.groups import (
    DataConfig,
    EvalSettings,
    LMConfig,
    LoraSettings,
    OnlineConfig,
    OptimConfig,
    TestSettings,
    check_group,
    flag_name,
    seed_list,
    setting,
)

__all__ = [
    "TrainConfig",
    "OptimConfig",
    "DataConfig",
    "EvalSettings",
    "TestSettings",
    "OnlineConfig",
    "LMConfig",
    "LoraSettings",
    "GROUPS",
    "UNSET_DEFAULTS",
    "check_device",
    "resolve_device",
    "config_leaves",
    "seed_list",
]


#: The nested groups of :class:`TrainConfig`: attribute name -> dataclass.
GROUPS: dict[str, type] = {
    "optim": OptimConfig,
    "data": DataConfig,
    "eval": EvalSettings,
    "test": TestSettings,
    "online": OnlineConfig,
    "lm": LMConfig,
    "lora": LoraSettings,
}

#: The keys under which a file or dict may give the agent's settings as one mapping or string.
AGENT_KEYS = ("agent_config", "agent_args")

#: What an unset preset field means when the agent has no preset for it.
UNSET_DEFAULTS: dict[str, Any] = {"online_every": 0, "online_ratio": 0.5, "lm_coef": 0.0}
_PRESETS = {"online_every": ("online", "every"), "online_ratio": ("online", "ratio"), "lm_coef": ("lm", "coef")}


@dataclass
class TrainConfig:
    """One training run: the agent and its settings, the models, the groups, checkpoints."""

    PREFIX: ClassVar[str] = ""
    agent: str = setting("bd", "agent name (see `tdrl agents`)")
    agent_config: Any = field(
        default=None, metadata={"help": "the agent's settings: an instance of its Config (None: its defaults)"}
    )
    teacher: str = setting("bundled", "teacher: bundled, tiny, a local directory or a hub id")
    teacher_dtype: str = setting(
        "float32", "teacher dtype: float32, bfloat16 or float16", choices=("float32", "bfloat16", "float16")
    )
    teacher_device_map: str | None = setting(
        None,
        "spread a big teacher over devices (accelerate's big-model loading; --device is then the student's only): "
        "auto, a device such as cuda:1, or a JSON object of module names to devices",
    )
    student: str = setting(
        "layers:0,10,20,29", "student: tiny, layers:i,j,... (from the teacher), a directory or hub id"
    )
    gradient_checkpointing: bool = setting(
        False,
        "recompute the student's decoder layers in the backward pass instead of keeping their activations (less "
        "memory, about one more trunk forward per step; the same loss and gradients)",
    )
    out: str = setting("runs/tdrl", "run directory (checkpoints, TensorBoard events, summary.json)")
    seed: int = setting(0, "seed of initialisation, data order and sampling", range="[0, 2**32)")
    device: str = setting("cpu", "torch device of student and teacher (checked when the run starts)")
    fsdp: bool = setting(
        False, "shard weights, gradients and AdamW state over the processes (FSDP2; CPU/gloo tested), not DDP"
    )
    overwrite: bool = setting(
        False,
        "replace a run already in --out (else a second run into it is refused); with --resume CHECKPOINT: delete "
        "the run's checkpoints and best/ newer than it",
    )
    log_every: int = setting(10, "log training scalars every N steps", range=">= 1")
    checkpoint_every: int = setting(
        50, "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)", range=">= 1"
    )
    keep_last: int = setting(2, "checkpoints to keep (the best one is kept apart in best/)", range=">= 1")
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    test: TestSettings = field(default_factory=TestSettings)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        for name, group in GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _group_from_dict(group, value, name))
            elif not isinstance(value, group):
                raise ConfigError(f"{name} must be a {group.__name__}, got {type(value).__name__}")
        if isinstance(self.teacher_device_map, dict):  # a YAML mapping: kept as the JSON the flag takes
            self.teacher_device_map = json.dumps(self.teacher_device_map)
        check_group(self)
        if not self.out.strip():
            raise ConfigError("--out must name a run directory, got an empty string")
        if self.teacher_device_map is not None:
            from tdrl.models.placement import parse_device_map

            parse_device_map(self.teacher_device_map)  # its form; its devices are checked when the teacher loads
        if self.optim.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError(
                "--mixed-precision fp16 needs a CUDA GPU (its loss scaling is CUDA's): use bf16 on the CPU"
            )
        if self.agent_config is not None:
            from tdrl.agents import AgentConfig, get_agent

            if isinstance(self.agent_config, dict):
                self.agent_config = agent_config_from_dict(self.agent, self.agent_config)
            elif not isinstance(self.agent_config, AgentConfig) or type(self.agent_config) is not (
                get_agent(self.agent).Config
            ):
                raise ConfigError(
                    f"agent_config must be {self.agent}'s {get_agent(self.agent).Config.__name__}, got "
                    f"{type(self.agent_config).__name__}"
                )

    # ------------------------------------------------------------------ views
    @property
    def test_seeds(self) -> list[int]:
        """The test's sampling seeds: ``test_seeds``, else ``eval_seeds``."""
        return list(self.test.seeds) if self.test.seeds is not None else list(self.eval.seeds)

    def flat(self) -> dict[str, Any]:
        """Every leaf by its flag name (``{"lr": 1e-4, "eval_every": 50, ...}``), the agent's settings as
        a dict under ``agent_config``."""
        out = {name: getattr(self, name) for name in _TOP}
        for group_name, group in GROUPS.items():
            value = getattr(self, group_name)
            out.update({flag_name(group, f.name): getattr(value, f.name) for f in dataclasses.fields(group)})
        out["agent_config"] = dataclasses.asdict(self.agent_config) if self.agent_config is not None else None
        return out

    def to_dict(self) -> dict[str, Any]:
        """The nested form (what ``config.json`` of a checkpoint and ``summary.json`` hold)."""
        out = {name: getattr(self, name) for name in _TOP}
        out["agent_config"] = dataclasses.asdict(self.agent_config) if self.agent_config is not None else None
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in GROUPS})
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from the nested form, flat flag names, or a mix (a setting given twice is an error);
        ``agent_args`` (a ``key=value,...`` string, JSON or a mapping) and agent fields at the top level
        are the agent's settings. Unknown keys are an error."""
        values = dict(values)
        top, groups, settings = {}, {name: {} for name in GROUPS}, {}
        for name in list(values):
            if name in GROUPS and isinstance(values[name], dict):
                for key, value in values.pop(name).items():
                    put_once(groups[name], key, value, f"{name}.{key}")
        by_flag = _flags()
        own = agent_fields(values.get("agent", cls.agent))
        for key, value in values.items():
            if key in AGENT_KEYS:
                settings = merge_once(settings, agent_values(value), key)
            elif key in _TOP:
                top[key] = value
            elif key in by_flag:
                group, name = by_flag[key]
                put_once(groups[group], name, value, key)
            elif key in own:
                settings = merge_once(settings, {key: value}, key)
            else:
                raise ConfigError(f"unknown setting {key!r} (see `tdrl train --help`)")
        agent = top.get("agent", cls.agent)
        config = agent_config_from_dict(agent, settings) if settings else None
        return cls(**top, agent_config=config, **groups)

    def replace(self, **changes) -> TrainConfig:
        """A copy with settings changed by flag name (``replace(lr=1e-3, eval_every=0)``), group
        (``optim=OptimConfig(...)`` or a dict of its fields) or ``agent_config`` (an instance, a dict or
        ``"key=value,..."``). A new ``agent`` drops the old agent's settings unless ``agent_config`` comes
        with it; on a resolved config it is refused unless the preset settings come with it too (they
        hold the old agent's presets, which cannot be told from values the user set)."""
        values = self.to_dict()
        new_agent = "agent" in changes and changes["agent"] != self.agent
        if new_agent and "agent_config" not in changes:
            values["agent_config"] = None
        if new_agent and self.resolved and not set(_PRESETS) <= set(changes):
            raise ConfigError(
                f"this config is resolved for {self.agent} (its presets fill {', '.join(_PRESETS)}): change the "
                "agent on the config before resolve(), or pass those settings too"
            )
        instance, flat = None, {}
        for key, value in changes.items():
            if key in GROUPS and (dataclasses.is_dataclass(value) or isinstance(value, dict)):
                values[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
            elif key == "agent_config" and dataclasses.is_dataclass(value):
                instance, values[key] = value, None
            elif key == "agent_config":
                values[key] = value
            else:
                flat[key] = value
        by_flag, own, settings = _flags(), agent_fields(values["agent"]), {}
        whole = {g for g in GROUPS if g in changes and not isinstance(changes[g], str)}
        twice = sorted(k for k in flat if k in by_flag and by_flag[k][0] in whole)
        if twice:
            raise ConfigError(f"setting(s) {', '.join(twice)} given twice (as a flag and in their group): keep one")
        for key, value in flat.items():
            if key in _TOP:
                values[key] = value
            elif key in by_flag:
                group, name = by_flag[key]
                values[group][name] = value
            elif key in own:  # one of the agent's settings: replace(gamma=0.5)
                settings[key] = value
            else:
                raise ConfigError(f"unknown setting {key!r}")
        if settings and instance is not None:
            instance = dataclasses.replace(instance, **settings)
        elif settings:
            values["agent_config"] = {**agent_values(values.get("agent_config")), **settings}
        config = TrainConfig.from_dict(values)
        return dataclasses.replace(config, agent_config=instance) if instance is not None else config

    # ------------------------------------------------------------------ presets
    @property
    def resolved(self) -> bool:
        """Whether the agent's Config and presets are filled (:meth:`resolve`)."""
        return self.agent_config is not None and all(
            getattr(getattr(self, g), n) is not None for g, n in _PRESETS.values()
        )

    def resolve(self, agent_cls: type | None = None) -> TrainConfig:
        """A copy with the agent's Config filled (its defaults when unset) and every preset field
        (``online_every``, ``online_ratio``, ``lm_coef``) set: the user's value, else the agent's preset
        (:attr:`~tdrl.agents.Agent.trainer_defaults`), else :data:`UNSET_DEFAULTS`. A resolved config
        is returned as is: presets are resolved once."""
        from tdrl.agents import get_agent

        if agent_cls is not None and agent_cls.name != self.agent:
            raise ConfigError(f"resolve({agent_cls.__name__}) on a config for agent {self.agent!r}: make them agree")
        if self.resolved:
            return self
        agent_cls = agent_cls or get_agent(self.agent)
        changes: dict[str, Any] = {"agent_config": self.agent_config or agent_cls.Config()}
        for flag, (group, name) in _PRESETS.items():
            if getattr(getattr(self, group), name) is None:
                changes[flag] = agent_cls.trainer_defaults.get(flag, UNSET_DEFAULTS[flag])
        return self.replace(**changes)

    def hparams(self) -> dict[str, Any]:
        """The run's settings for TensorBoard's HParams tab: the main flags and every agent setting."""
        keep = ("agent", "student", "teacher", "seed", "steps", "batch_size", "lr", "annotation_top_k")
        keep += ("annotation_top_p", "mixed_precision", "lm_coef", "online_every", "online_ratio")
        keep += ("gradient_checkpointing", "lora_rank")
        flat = self.flat()
        values = {k: flat[k] for k in keep}
        values.update({f"agent.{k}": v for k, v in (flat["agent_config"] or {}).items()})
        return values


#: The top-level leaves of TrainConfig (the groups and agent_config aside).
_TOP = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in GROUPS and f.name != "agent_config")


def config_leaves() -> list[tuple[str | None, dataclasses.Field, str]]:
    """Every leaf of TrainConfig as ``(group or None, field, flag name)``, in declaration order."""
    leaves = [(None, TrainConfig.__dataclass_fields__[name], name) for name in _TOP]
    for group_name, group in GROUPS.items():
        leaves += [(group_name, f, flag_name(group, f.name)) for f in dataclasses.fields(group)]
    return leaves


def _flags() -> dict[str, tuple[str, str]]:
    return {flag: (group, f.name) for group, f, flag in config_leaves() if group is not None}


def put_once(target: dict, key: str, value, where: str) -> None:
    """``target[key] = value``, refusing a setting given twice (``where`` names it in the error)."""
    if key in target:
        raise ConfigError(f"setting {where} given twice: keep one")
    target[key] = value


def merge_once(old: dict, new: dict, where: str) -> dict:
    """Two mappings of agent settings joined, refusing a setting given in both."""
    twice = sorted(set(old) & set(new))
    if twice:
        raise ConfigError(f"agent setting(s) {', '.join(twice)} given twice ({where}): keep one")
    return {**old, **new}


def _group_from_dict(group: type, values: dict, name: str):
    known = {f.name for f in dataclasses.fields(group)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name} has no setting(s) {', '.join(unknown)}; its settings: {', '.join(sorted(known))}")
    return group(**values)


def agent_fields(agent: str) -> set[str]:
    """The names of the settings of agent ``agent``'s Config."""
    from tdrl.agents import get_agent

    return {f.name for f in dataclasses.fields(get_agent(agent).Config)}


def agent_values(value) -> dict:
    """Agent settings from a mapping, a Config instance, or a ``key=value,...`` / JSON string."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, str):
        from tdrl.training.args import parse_agent_args

        return parse_agent_args(value)
    raise ConfigError(f"agent settings must be a mapping or 'key=value,...', got {type(value).__name__}")


def agent_config_from_dict(agent: str, values: dict):
    """The agent's Config from a mapping (unknown fields: a ConfigError listing its settings)."""
    from tdrl.agents import get_agent

    cls = get_agent(agent).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"agent {agent!r} has no setting(s) {', '.join(unknown)}; its settings: {', '.join(sorted(fields))}"
        )
    return cls(**values)
