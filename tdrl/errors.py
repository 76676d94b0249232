"""Typed errors. Each message says what went wrong and what to do about it.

Every error derives from :class:`TdrlError`, so callers (and the CLI, which prints one line and
exits non-zero) can catch them all; each also derives from the matching builtin (``ValueError``,
``FileNotFoundError``, ``ImportError``) so ordinary ``except`` clauses keep working.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

__all__ = [
    "TdrlError",
    "ConfigError",
    "VocabularyMismatchError",
    "ModelNotFoundError",
    "MissingDependencyError",
    "DataError",
    "CheckpointNotFoundError",
    "NonFiniteError",
    "check_field_types",
    "check_discount",
]


class TdrlError(Exception):
    """Base class of every error tdrl raises on purpose."""


class ConfigError(TdrlError, ValueError):
    """A setting is out of range or unknown (e.g. top_p outside (0, 1], an unknown agent name)."""


class VocabularyMismatchError(TdrlError, ValueError):
    """Teacher and student (or a cache and a tokenizer) do not share one vocabulary."""


class ModelNotFoundError(TdrlError, FileNotFoundError):
    """A teacher/student name is neither a known alias, a local directory, nor a reachable hub id."""


class MissingDependencyError(TdrlError, ImportError):
    """An optional package is missing; the message names the pip command that installs it."""


class DataError(TdrlError, ValueError):
    """A data source or cache is empty, malformed, or was built for something else."""


class CheckpointNotFoundError(TdrlError, FileNotFoundError):
    """A checkpoint directory to resume from or evaluate does not exist or is incomplete."""


class NonFiniteError(TdrlError, FloatingPointError):
    """Training diverged: the loss or the weights are no longer finite numbers (NaN or inf)."""


def check_discount(value, name: str = "gamma", why: str = "") -> None:
    """A discount: a number in [0, 1] (NaN, bools and strings refused); ``why`` joins the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1]{why}, got {value!r}")


def check_field_types(instance, name_of=None) -> None:
    """Each field of a dataclass instance has its annotated type (ints given for floats become floats;
    None only where the annotation allows it; ``list[int]`` fields hold lists of ints; no float is NaN or
    infinite: ``alpha=.inf`` or ``--lr nan`` would only surface as NaN weights later); else
    :class:`~tdrl.errors.ConfigError` naming the field (``name_of(field name)``, e.g. its flag name).
    YAML, JSON and ``key=value`` strings reach the configs untyped: this is where ``steps: null`` or
    ``alpha=abc`` is caught, before any arithmetic on it."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        hint, value = hints[f.name], getattr(instance, f.name)
        name = name_of(f.name) if name_of else f.name
        if hint is typing.Any:
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        lists = [a for a in options if typing.get_origin(a) is list]
        allowed = tuple(a for a in options if isinstance(a, type) and typing.get_origin(a) is None)
        if value is None and type(None) in allowed:
            continue
        if lists and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(lists[0]) or (object,)
            bad = [v for v in value if not isinstance(v, item) or (isinstance(v, bool) and item is not bool)]
            if bad:
                raise ConfigError(f"{name} must be a list of {item.__name__}, got {list(value)!r}")
            setattr(instance, f.name, list(value))
            continue
        if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(instance, f.name, str(value))  # YAML reads `student: 7` or `test_split: 2024` as a number
            continue
        if float in allowed and isinstance(value, str):
            try:  # YAML 1.1 reads `1e-3` (no dot) as a string
                value = float(value)
            except ValueError:
                pass
            else:
                setattr(instance, f.name, value)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(instance, f.name, float(value))
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        if bool not in allowed and isinstance(value, bool) and (int in allowed or float in allowed):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not isinstance(value, allowed):
            kinds = [f"a list of {typing.get_args(a)[0].__name__}" for a in lists]
            kinds += ["null" if a is type(None) else a.__name__ for a in allowed]
            raise ConfigError(f"{name} must be {' or '.join(kinds)}, got {value!r}")
