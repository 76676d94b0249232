"""The settings every agent shares (:class:`AgentConfig`) and :func:`hp`, the field helper every
agent's Config uses (its ``--help`` text: the typed agent flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tdrl.errors import DISCOUNT_RANGE, Range, check_config
from tdrl.models.student import VOCAB_CHUNK

__all__ = ["AgentConfig", "RESTRICT_MODES", "hp"]

RESTRICT_MODES = ("mdp", "set", "none")

_UNDECLARED = object()


def hp(
    default,
    help: str,
    *,
    flag: str | None = None,
    factory=None,
    range=_UNDECLARED,
    choices: tuple[str, ...] | None = None,
    why: str | None = None,
):
    """A field of a config dataclass with its ``--help`` text and its valid values: an agent's Config
    (its typed flags) and the trainer's groups (:mod:`tdrl.training.groups`) both declare their settings
    with it. ``flag`` overrides the flag name (the trainer's groups: default the group's prefix + the
    field's name); ``factory`` gives a mutable default (a list).

    ``range``: the interval a number must lie in, as a :class:`~tdrl.errors.Range` spec (``">= 1"``,
    ``"> 0"``, ``"[0, 1)"``, ``"(0, 1]"``, ``"[0, 2**31)"``); a list field's range holds for each element,
    and ``None`` (an optional setting left unset) is never checked. ``choices``: the strings a setting may
    take. ``why``: the reason, or a hint, joined to the error message; ``range=None`` declares a number truly
    unbounded and needs a ``why``. The config's ``__post_init__`` checks them
    (:func:`~tdrl.errors.check_config`), ``--help`` and docs/reference/configuration.md print them. A
    field declared again in a subclass without range or choices keeps those of the field it overrides.
    A bad spec, or a default outside its own range, is an error here, when the class is defined."""
    meta = {"help": help, **({"flag": flag} if flag else {})}
    if range is not _UNDECLARED and choices is not None:
        raise ValueError("a setting has a range or choices, not both")
    if range is None and not why:
        raise ValueError(f"{help!r}: range=None (unbounded) needs a why= saying why no range applies")
    if range is not _UNDECLARED:
        meta["range"] = None if range is None else Range.parse(range)
    if choices is not None:
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{help!r}: choices is a non-empty tuple of strings, got {choices!r}")
        meta["choices"] = tuple(choices)
    if why:
        meta["why"] = why
    value = factory() if factory is not None else default
    if value is not None and meta.get("range") is not None:
        values = value if isinstance(value, list) else [value]
        if not all(v in meta["range"] for v in values):
            raise ValueError(f"{help!r}: the default {value!r} lies outside its own range {meta['range']}")
    if value is not None and choices is not None and value not in meta["choices"]:
        raise ValueError(f"{help!r}: the default {value!r} is not one of its choices {meta['choices']}")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class AgentConfig:
    """Settings every agent shares.

    Attributes:
        restrict: what the teacher's set A_p(s) restricts (see :mod:`tdrl.agents.base`): ``"mdp"``
            (default: the backups, values and targets; the student normalised over V), ``"set"``
            (ablation: the student's softmax normalised on A_p(s) as well, which leaves its mass
            outside the set free) or ``"none"`` (ablation: everything over V).
        gamma: discount (the paper: 0.99).
        top_p: re-cut the data's A_p(s) at this p (``None``: keep the annotation's p).
        support_coef: weight of the exact support term ``E_s[-log pi_S(A_p(s)|s)]`` (the student's
            mass outside A_p(s), as a log-loss) added by :meth:`Agent.forward` with ``restrict="mdp"``;
            computed from the full-vocabulary normaliser at the decoding temperature. 0 by default;
            agents whose losses leave that mass free set their own default.
        vocab_chunk: vocabulary columns per chunk of the full-vocabulary normaliser (memory knob).
        head_lr_scale: learning-rate multiplier of the heads an agent adds (a value head starts at zero
            and must reach the scale of the returns, while the pretrained student needs small steps).
    """

    restrict: str = hp(
        "mdp",
        "what A_p(s) restricts: mdp (backups, values, targets; the student normalised over V), set "
        "(ablation: the student normalised on A_p(s) too) or none (ablation: everything over V)",
        choices=RESTRICT_MODES,
    )
    gamma: float = hp(0.99, "discount (the paper: 0.99)", range=DISCOUNT_RANGE)
    top_p: float | None = hp(
        None,
        "re-cut the annotation's A_p(s) at this p: the top-p MDP's p (default: --annotation-top-p; "
        "decoding's nucleus is --eval-top-p)",
        range="(0, 1]",
        why="0.8: the paper's; 1.0: no nucleus cut",
    )
    support_coef: float = hp(
        0.0, "weight of the exact support term E_s[-log pi_S(A_p(s)|s)] (restrict=mdp)", range=">= 0"
    )
    vocab_chunk: int = hp(
        VOCAB_CHUNK, "vocabulary columns per chunk of the full-vocabulary normaliser (memory)", range=">= 1"
    )
    head_lr_scale: float = hp(
        1.0, "learning-rate multiplier of the heads the agent adds (value / Q heads)", range="> 0"
    )

    def __post_init__(self):
        check_config(self)
