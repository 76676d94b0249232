"""The settings every agent shares (:class:`AgentConfig`) and :func:`hp`, the field helper every
agent's Config uses (its ``--help`` text: the typed agent flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tdrl.errors import ConfigError, check_discount, check_field_types
from tdrl.models.student import VOCAB_CHUNK

__all__ = ["AgentConfig", "RESTRICT_MODES", "hp"]

RESTRICT_MODES = ("mdp", "set", "none")


def hp(default, help: str, *, flag: str | None = None, factory=None):
    """A field of a config dataclass with its ``--help`` text: an agent's Config (its typed flags) and the
    trainer's groups (:mod:`tdrl.training.groups`) both declare their settings with it. ``flag``
    overrides the flag name (the trainer's groups: default the group's prefix + the field's name);
    ``factory`` gives a mutable default (a list)."""
    meta = {"help": help, **({"flag": flag} if flag else {})}
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
    )
    gamma: float = hp(0.99, "discount (the paper: 0.99)")
    top_p: float | None = hp(
        None,
        "re-cut the annotation's A_p(s) at this p: the top-p MDP's p (default: --annotation-top-p; "
        "decoding's nucleus is --eval-top-p)",
    )
    support_coef: float = hp(0.0, "weight of the exact support term E_s[-log pi_S(A_p(s)|s)] (restrict=mdp)")
    vocab_chunk: int = hp(VOCAB_CHUNK, "vocabulary columns per chunk of the full-vocabulary normaliser (memory)")
    head_lr_scale: float = hp(1.0, "learning-rate multiplier of the heads the agent adds (value / Q heads)")

    def __post_init__(self):
        check_field_types(self)
        if self.restrict not in RESTRICT_MODES:
            raise ConfigError(f"restrict must be one of {', '.join(RESTRICT_MODES)}, got {self.restrict!r}")
        check_discount(self.gamma)
        if self.support_coef < 0:
            raise ConfigError(f"support_coef must be >= 0, got {self.support_coef}")
        if self.vocab_chunk < 1:
            raise ConfigError(f"vocab_chunk must be >= 1, got {self.vocab_chunk}")
        if not self.head_lr_scale > 0:
            raise ConfigError(f"head_lr_scale must be > 0, got {self.head_lr_scale}")
        if self.top_p is not None:
            from tdrl.actions import validate_top_p

            try:
                validate_top_p(self.top_p)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
