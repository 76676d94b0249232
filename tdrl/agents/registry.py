"""The agent registry: built-in agents register with :func:`register_agent`; other packages
advertise theirs in the ``tdrl.agents`` entry-point group."""

from __future__ import annotations

import dataclasses
import re
import warnings
from importlib import metadata

from tdrl.agents.base import Agent
from tdrl.agents.config import AgentConfig
from tdrl.errors import ConfigError
from tdrl.models.student import Student

__all__ = ["register_agent", "get_agent", "list_agents", "make_agent"]

_REGISTRY: dict[str, type[Agent]] = {}
_ENTRY_POINTS_LOADED = False
#: make_agent's own parameters: no agent setting may take one of these names
_RESERVED = ("name", "student", "config", "teacher")
#: What an agent's name may be: it becomes part of compare's specs and run directories.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")


def register_agent(name: str):
    """Class decorator: register an :class:`Agent` subclass under ``name``."""

    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"agent name {name!r}: use lower-case letters, digits, '-' and '_' (a spec such as 'bd:alpha=0.1' and a "
            "run directory are made of it)"
        )

    def decorate(cls: type[Agent]) -> type[Agent]:
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise TypeError(f"@register_agent({name!r}) must decorate an Agent subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"an agent named {name!r} is already registered ({_REGISTRY[name].__module__})")
        clash = sorted({f.name for f in dataclasses.fields(cls.Config)} & set(_RESERVED))
        if clash:
            raise ConfigError(f"agent {name!r}: rename the setting(s) {', '.join(clash)} (make_agent's own parameters)")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    """Import third-party agents advertised in the ``tdrl.agents`` entry-point group (once)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for entry in metadata.entry_points(group="tdrl.agents"):
        try:
            obj = entry.load()
        except Exception as exc:  # one broken plug-in must not take every command down with it
            warnings.warn(
                f"the tdrl.agents entry point {entry.name!r} ({entry.value}) failed to import: {exc}", stacklevel=2
            )
            continue
        if not (isinstance(obj, type) and issubclass(obj, Agent)):
            warnings.warn(
                f"the tdrl.agents entry point {entry.name!r} ({entry.value}) is not an Agent subclass", stacklevel=2
            )
        elif entry.name in _REGISTRY and _REGISTRY[entry.name] is not obj:
            warnings.warn(
                f"the tdrl.agents entry point {entry.name!r} ({entry.value}) is ignored: {entry.name!r} is "
                f"{_REGISTRY[entry.name].__module__}'s",
                stacklevel=2,
            )
        elif entry.name not in _REGISTRY:
            try:
                register_agent(entry.name)(obj)
            except ConfigError as exc:
                warnings.warn(f"the tdrl.agents entry point {entry.name!r} is ignored: {exc}", stacklevel=2)


def list_agents() -> list[str]:
    """Names of every registered agent (built-in and entry-point plug-ins), sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_agent(name: str) -> type[Agent]:
    """The agent class registered as ``name``; :class:`~tdrl.errors.ConfigError` if unknown."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown agent {name!r}: choose one of {', '.join(sorted(_REGISTRY))} (see `tdrl agents`)")
    return _REGISTRY[name]


def make_agent(name: str, student: Student, config: AgentConfig | None = None, *, teacher=None, **overrides) -> Agent:
    """Build agent ``name`` on ``student``.

    ``config``: an instance of the agent's own Config (``get_agent(name).Config``), used as is, or
    with ``overrides`` applied (``dataclasses.replace``, validated again); without it the Config is
    built from its defaults updated by ``overrides``. Unknown settings, or a config of another class,
    raise :class:`~tdrl.errors.ConfigError`. ``teacher``: the teacher, kept outside the agent's state
    (:attr:`Agent.teacher`); agents with ``needs_teacher`` refuse to be built without one."""
    cls = get_agent(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"agent {name!r} has no setting(s) {', '.join(unknown)}; its settings: {', '.join(sorted(fields))}"
        )
    if config is None:
        config = cls.Config(**overrides)
    elif type(config) is not cls.Config:
        raise ConfigError(
            f"agent {name!r} takes a {cls.Config.__name__}, got a {type(config).__name__}: build it with "
            f"get_agent({name!r}).Config(...) or pass the settings as keywords"
        )
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return cls(student, config, teacher=teacher)
