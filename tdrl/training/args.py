"""A :class:`~tdrl.training.config.TrainConfig` from the command line and a YAML/JSON file.

``tdrl train --config run.yaml --agent iqlearn --expert-term topp_mean --lr 3e-4``: the command's
presets (``tdrl demo``'s, ``tdrl warm-start``'s), then the file, then the flags, each overriding the
one before. :func:`add_config_arguments` adds one flag per config leaf (``--lr``, ``--eval-every``,
``--eval-seeds 0 1 2``, ``--eval-greedy`` / ``--no-eval-greedy``) and, when given the agent's Config,
the agent's own typed flags under their own heading (``tdrl train --agent bd --help`` lists them);
every flag's default is read from the dataclasses (or the command's presets) and written nowhere else.
Agent settings may also come as ``--agent-args key=value,...`` (or JSON), as an ``agent_args`` /
``agent_config`` mapping or as top-level keys in the file; a setting given twice is an error. Files are
read with ``yaml.safe_load`` / ``json``; unknown keys are an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from tdrl.errors import ConfigError, field_limits
from tdrl.training.config import (
    AGENT_KEYS,
    GROUPS,
    TrainConfig,
    agent_fields,
    agent_values,
    config_leaves,
    merge_once,
    put_once,
    seed_list,
)

__all__ = [
    "parse_agent_args",
    "load_config_file",
    "flatten",
    "add_config_arguments",
    "config_from_args",
    "agent_from_argv",
    "parse_train_args",
]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise ConfigError(f"setting(s) {', '.join(twice)} given twice in one mapping: keep one")
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook that refuses a key given twice (JSON itself keeps the last)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"setting(s) {', '.join(twice)} given twice in one JSON object: keep one")
    return dict(pairs)


def parse_agent_args(text: str) -> dict[str, Any]:
    """``"alpha=0.1,chi2=false"`` or ``'{"alpha": 0.1}'`` -> a dict (values parsed as YAML scalars)."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text, object_pairs_hook=_unique_pairs)
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
        if key.strip() in out:
            raise ConfigError(f"agent setting {key.strip()} given twice in {text!r}: keep one")
        out[key.strip()] = yaml.safe_load(raw.strip())
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a flat dict of settings by flag name (nested groups flattened;
    the agent's settings under ``agent_args`` / ``agent_config`` or at the top level)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        # safe loading (yaml.SafeLoader), refusing a key given twice
        data = (
            json.loads(text, object_pairs_hook=_unique_pairs)
            if path.suffix == ".json"
            else yaml.load(text, _UniqueKeyLoader)
        )  # noqa: S506
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return flatten(data, where=str(path))


def flatten(values: dict[str, Any], where: str = "settings") -> dict[str, Any]:
    """Nested groups (``optim: {lr: ...}``) to flag names (``lr``); other keys are kept as they are."""
    flags = {(group, f.name): flag for group, f, flag in config_leaves() if group is not None}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, dict):
            for name, inner in value.items():
                flag = flags.get((key, name))
                if flag is None:
                    raise ConfigError(f"{where}: {key} has no setting {name!r}")
                put_once(out, flag, inner, f"{where}: {key}.{name}")
        else:
            put_once(out, key, value, f"{where}: {key}")
    return out


def _kind(hint) -> tuple[Any, dict]:
    """(argparse type, extra add_argument kwargs) for a field's annotation."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    if typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in options):
        return _int_list, {"nargs": "+"}
    base = options[0] if len(options) == 1 else hint
    if base is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if base in (int, float, str):
        return base, {}
    return str, {}


def _int_list(text: str) -> list[int]:
    try:
        return seed_list("seeds", text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, e.g. 0 1 2 or 0,1,2; got {text!r}") from None


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value) if value == "" else str(value)


def limits_text(cls: type, name: str, hint=None) -> tuple[str, str | None]:
    """What ``--help`` shows of a field's valid values: ``(" (range: [0, 1))", None)`` for a range
    (``each in`` for a list), ``("", "{mdp,set,none}")`` for choices (argparse's metavar)."""
    _, limits, choices, _ = field_limits(cls, name)
    if choices is not None:
        return "", "{" + ",".join(choices) + "}"
    if limits is None:
        return "", None
    each = "each in " if hint is not None and _kind(hint)[1].get("nargs") else ""
    return f" (range: {each}{limits})", None


def _help(cls: type, f: dataclasses.Field, hint, default) -> tuple[str, str | None]:
    """A field's ``--help`` text (its help, its range, its default; ``%`` escaped) and its metavar."""
    limits, metavar = limits_text(cls, f.name, hint)
    return f"{f.metadata.get('help', '')}{limits} (default: {_shown(default)})".replace("%", "%%"), metavar


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    agent_config: type | None = None,
    presets: dict[str, Any] | None = None,
    agent: bool = True,
    groups: tuple[str, ...] = tuple(GROUPS),
    agent_presets: dict[str, Any] | None = None,
) -> None:
    """Every TrainConfig leaf of the run and of ``groups`` as a flag (grouped as the config is),
    ``--config``, and (``agent``) ``--agent`` and ``--agent-args``; with ``agent_config`` (an agent's
    Config class) that agent's typed flags. A command that chooses the agent itself (``compare``: its
    specs; ``warm-start``: KD) passes ``agent=False``, and one that fixes a group leaves it out of
    ``groups``, so that no flag is accepted and then ignored. Flags default to "not given"
    (argparse.SUPPRESS) so that the file and the presets below them are kept; the help shows the
    effective default: ``presets``, else the agent's ``agent_presets`` (its ``trainer_defaults``), else
    the dataclass default."""
    presets, agent_presets = presets or {}, agent_presets or {}
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (flags override it)")
    if agent:
        parser.add_argument(
            "--agent-args",
            default=argparse.SUPPRESS,
            help="agent settings as key=value pairs separated by commas, or a JSON object",
        )
    sections = {None: parser.add_argument_group("run")}
    sections.update({name: parser.add_argument_group(f"{name} ({GROUPS[name].__name__})") for name in groups})
    hints = {None: typing.get_type_hints(TrainConfig)}
    hints.update({name: typing.get_type_hints(cls) for name, cls in GROUPS.items()})
    for group, f, flag in config_leaves():
        if (group is None and (f.name == "agent_config" or (f.name == "agent" and not agent))) or (
            group is not None and group not in groups
        ):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = presets.get(flag, agent_presets.get(flag, default))
        kind, extra = _kind(hints[group][f.name])
        text, metavar = _help(GROUPS[group] if group else TrainConfig, f, hints[group][f.name], default)
        if metavar:
            extra = {**extra, "metavar": metavar}
        sections[group].add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, default=argparse.SUPPRESS, help=text, type=kind, **extra
        )
    if agent_config is not None:
        taken = {flag for _, _, flag in config_leaves()}
        section = parser.add_argument_group(f"agent settings ({agent_config.__name__})")
        agent_hints = typing.get_type_hints(agent_config)
        for f in dataclasses.fields(agent_config):
            if f.name in taken:
                raise ConfigError(f"{agent_config.__name__}.{f.name} shadows a trainer setting of that name: rename it")
            kind, extra = _kind(agent_hints[f.name])
            text, metavar = _help(agent_config, f, agent_hints[f.name], f.default)
            section.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f"agent.{f.name}",
                metavar=metavar or f.name.upper(),
                default=argparse.SUPPRESS,
                help=text,
                type=kind,
                **extra,
            )


def agent_from_argv(argv: list[str], presets: dict[str, Any] | None = None) -> str:
    """The agent a command line names: ``--agent X``, else its ``--config`` file's ``agent``, else the
    presets', else TrainConfig's default (read before the parser is built: its typed flags depend on it)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--agent")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.agent:
        return known.agent
    if known.config:
        agent = load_config_file(known.config).get("agent")
        if agent:
            return str(agent)
    return (presets or {}).get("agent", TrainConfig.agent)


def config_from_args(ns: argparse.Namespace, presets: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of a parsed command line: presets < ``--config`` file < flags; the agent's
    settings from the file, ``--agent-args`` and typed flags (each at most once)."""
    given = {k: _flat_list(v) for k, v in vars(ns).items() if k in {flag for _, _, flag in config_leaves()}}
    typed = {k.split(".", 1)[1]: v for k, v in vars(ns).items() if k.startswith("agent.")}
    if "agent_args" in vars(ns):
        typed = merge_once(typed, parse_agent_args(ns.agent_args), "--agent-args and a typed flag")
    values = {**(presets or {})}
    file_values = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    agent = given.get("agent", file_values.get("agent", values.get("agent", TrainConfig.agent)))
    fields = agent_fields(agent)
    leaves = {flag for _, _, flag in config_leaves()}
    unknown = sorted(set(file_values) - leaves - fields - set(AGENT_KEYS))
    if unknown:
        raise ConfigError(
            f"{ns.config}: unknown setting(s) {', '.join(unknown)} (not trainer settings, nor settings of the agent "
            f"{agent}: see `tdrl train --agent {agent} --help`)"
        )
    file_agent: dict[str, Any] = {}
    for key, value in file_values.items():
        if key in AGENT_KEYS:
            file_agent = merge_once(file_agent, agent_values(value), f"{ns.config} ({key})")
        elif key in fields and key not in leaves:
            file_agent = merge_once(file_agent, {key: value}, str(ns.config))
        else:
            values[key] = value
    values.update(given)
    settings = {**file_agent, **typed}  # the command line overrides the file
    values.pop("agent_config", None)
    values.pop("agent_args", None)
    if settings:
        values["agent_config"] = settings
    return TrainConfig.from_dict(values)


def _flat_list(value):
    """``--eval-seeds 0,1 2`` parses to ``[[0, 1], [2]]``: one list."""
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return [x for v in value for x in v]
    return value


def one_line_errors(parser: argparse.ArgumentParser, prog: str | None = None):
    """An ``error`` for ``parser`` that raises a ConfigError (one line from the CLI, status 2) naming the
    help to read, instead of argparse's usage dump."""

    def error(message: str):
        raise ConfigError(f"{message} (see `{prog or parser.prog} --help`)")

    return error


def parse_train_args(
    argv: list[str], presets: dict[str, Any] | None = None, *, agent_flags: bool = True, prog: str = "tdrl train"
) -> tuple[TrainConfig, list[str]]:
    """Parse a training command line on its own (the library's entry point; the CLI builds its
    subparsers with :func:`add_config_arguments` the same way): returns the config and the arguments
    it does not know."""
    from tdrl.agents import get_agent

    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    parser.error = one_line_errors(parser)
    agent_config = get_agent(agent_from_argv(argv, presets)).Config if agent_flags else None
    add_config_arguments(parser, agent_config=agent_config, presets=presets)
    ns, rest = parser.parse_known_args(argv)
    return config_from_args(ns, presets), rest
