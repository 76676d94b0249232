"""Typed errors. Each message says what went wrong and what to do about it.

Every error derives from :class:`TdrlError`, so callers (and the CLI, which prints one line and
exits non-zero) can catch them all; each also derives from the matching builtin (``ValueError``,
``FileNotFoundError``, ``ImportError``) so ordinary ``except`` clauses keep working.

The checks every config dataclass runs on its fields live here too (:func:`check_config`): their types,
then the valid values each field declares with ``hp(..., range=..., choices=...)`` (a :class:`Range`,
parsed once when the class is defined).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass

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
    "check_ranges",
    "check_config",
    "check_seeds",
    "Range",
    "SEED_RANGE",
    "DISCOUNT_RANGE",
    "field_limits",
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


_NUMBER = re.compile(r"[+-]?(?:inf|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_HALF_LINE = re.compile(r"(>=|>|<=|<)\s*(\S+)")
_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])")


def _number(text: str, spec: str) -> int | float:
    """One end of a range spec: an int (``1``, ``2**31``), a float (``0.5``, ``1e-3``) or ``inf``."""
    base, _, power = text.partition("**")
    if not _NUMBER.fullmatch(base) or (power and not (power.isdigit() and base.lstrip("+-").isdigit())):
        raise ValueError(f"range {spec!r}: {text!r} is not a number (an int, a float, inf or a power such as 2**31)")
    value = int(base) if base.lstrip("+-").isdigit() else float(base)
    if not power:
        return value
    return -(abs(value) ** int(power)) if base.startswith("-") else value ** int(power)  # -2**4 is -16


def _shown(x: int | float) -> str:
    """An end of a range as its spec writes it: ``inf``, ``2**31`` (a large power of two), ``0.5``."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return str(x)


@dataclass(frozen=True)
class Range:
    """The interval a numeric setting must lie in: ``Range(0, 1, lo_open=False, hi_open=True)`` is
    ``[0, 1)``. :meth:`parse` reads the spec a field declares (``hp(..., range="[0, 1)")``): a half-line
    ``">= 1"``, ``"> 0"``, ``"<= 0"``, ``"< 0"`` or an interval ``"[0, 1)"``, ``"(0, 1]"``,
    ``"[0, 2**31)"``, ``"(-inf, 0)"``; an infinite end is open. ``str()`` writes the interval form
    (``"> 0"`` is ``(0, inf)``), which the error messages, ``--help`` and the docs show."""

    lo: int | float = -math.inf
    hi: int | float = math.inf
    lo_open: bool = True
    hi_open: bool = True

    def __post_init__(self):
        for end in (self.lo, self.hi):
            if isinstance(end, bool) or not isinstance(end, (int, float)) or math.isnan(end):
                raise ValueError(f"a range's ends are numbers, got {end!r}")
        if (math.isinf(self.lo) and not self.lo_open) or (math.isinf(self.hi) and not self.hi_open):
            raise ValueError(f"range {self}: an infinite end is open")
        if self.lo > self.hi or (self.lo == self.hi and (self.lo_open or self.hi_open)):
            raise ValueError(f"range {self} holds no number")

    @classmethod
    def parse(cls, spec: str) -> Range:
        """A spec (``">= 1"``, ``"(0, 1]"``, ...) as a Range; ``ValueError`` naming what is wrong."""
        if isinstance(spec, Range):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a range is a string such as '>= 1' or '[0, 1)', got {spec!r}")
        text = spec.strip()
        if half := _HALF_LINE.fullmatch(text):
            op, end = half.group(1), _number(half.group(2), spec)
            if op.startswith(">"):
                return cls(end, math.inf, lo_open=op == ">")
            return cls(-math.inf, end, hi_open=op == "<")
        if interval := _INTERVAL.fullmatch(text):
            left, lo, hi, right = interval.groups()
            return cls(_number(lo, spec), _number(hi, spec), lo_open=left == "(", hi_open=right == ")")
        raise ValueError(f"range {spec!r}: write '>= 1', '> 0', '<= 0', '< 0' or an interval such as '[0, 1)'")

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def check(self, value, name: str, why: str = "") -> None:
        """``value`` (a number, or each number of a list) lies in the range; else a ConfigError
        ``"<name> must lie in <range>, got <value> (<why>)"``."""
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(v in self for v in values):
            raise ConfigError(f"{name} must lie in {self}, got {value!r}{f' ({why})' if why else ''}")

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_shown(self.lo)}, {_shown(self.hi)}{')' if self.hi_open else ']'}"


#: What a sampling seed may be (every seed a config or ``tdrl eval --seeds`` takes).
SEED_RANGE = Range.parse("[0, 2**31)")
#: What a discount may be.
DISCOUNT_RANGE = Range.parse("[0, 1]")


def check_discount(value, name: str = "gamma", why: str = "") -> None:
    """A discount: a number in [0, 1] (NaN, bools and strings refused); ``why`` joins the message."""
    if value not in DISCOUNT_RANGE:
        raise ConfigError(f"{name} must lie in {DISCOUNT_RANGE}{why}, got {value!r}")


def check_seeds(name: str, seeds, hint: str = "") -> None:
    """Sampling seeds: at least one (``hint`` says what to do instead), each in :data:`SEED_RANGE`, no
    seed twice (a repeated seed is no independent sample); else a ConfigError naming ``name``."""
    if not seeds:
        raise ConfigError(f"{name} must name at least one seed{hint}")
    SEED_RANGE.check(list(seeds), name)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{name} repeats a seed ({list(seeds)}): repeated seeds are not independent samples")


def field_limits(cls: type, name: str) -> tuple[bool, Range | None, tuple | None, str]:
    """What field ``name`` of config dataclass ``cls`` declares (``hp(..., range=, choices=, why=)``):
    ``(declared, range, choices, why)``. A field a subclass declares again without a range or choices
    keeps those of the field it overrides (``BDConfig.top_p`` keeps AgentConfig's (0, 1])."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and ("range" in f.metadata or "choices" in f.metadata):
            return True, f.metadata.get("range"), f.metadata.get("choices"), f.metadata.get("why", "")
    return False, None, None, ""


def check_ranges(instance, name_of=None) -> None:
    """Each field of a config dataclass lies in the range, or is one of the choices, its declaration
    gives (:func:`field_limits`); ``None`` (an optional setting left unset) is not checked, a list is
    checked element by element. Else a ConfigError naming the field (``name_of(field name)``: the
    trainer's groups give its flag, ``--eval-top-p``) and the range. Run after :func:`check_field_types`."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if value is None:
            continue
        _, limits, choices, why = field_limits(type(instance), f.name)
        name = name_of(f.name) if name_of else f.name
        if limits is not None:
            limits.check(value, name, why)
        if choices is not None and value not in choices:
            shown = ", ".join(map(str, choices))
            raise ConfigError(f"{name} must be one of {shown}, got {value!r}{f' ({why})' if why else ''}")


def check_config(instance, name_of=None) -> None:
    """The checks every config dataclass runs first in ``__post_init__``: :func:`check_field_types`,
    then :func:`check_ranges` (what is left to ``__post_init__`` are the checks across fields)."""
    check_field_types(instance, name_of)
    check_ranges(instance, name_of)


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
