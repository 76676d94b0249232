"""The agent contract, the registry, and the batch view every agent shares.

An agent owns its maths (``loss``); the trainer owns optimisers, schedules, AMP and logging::

    @register_agent("my-agent")
    class MyAgent(Agent):
        Config = MyConfig                     # dataclass: loss in the docstring, defaults, metric names
        description = "one line for `tdrl agents`"
        def loss(self, batch) -> tuple[Tensor, dict[str, float]]: ...

A batch is the collated dict of :func:`tdrl.data.collate`. :meth:`Agent.transitions` turns it into
N transitions (s, a, r, s', done) over the response positions, flattened row-major, with ONE student
forward; :meth:`Agent.set_logits` gives logits on the action set (A_p(s) for ``restrict="topp"``,
the whole vocabulary for ``restrict="none"``) without ever building ``[B, T, V]`` on the sparse path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tdrl.errors import ConfigError
from tdrl.students import Student, column_logits, gather_logits

__all__ = [
    "Agent",
    "AgentConfig",
    "Transitions",
    "SetLogits",
    "register_agent",
    "get_agent",
    "list_agents",
    "make_agent",
    "masked_logsumexp",
    "masked_log_softmax",
    "RESTRICT_MODES",
]

RESTRICT_MODES = ("topp", "none")
_REGISTRY: dict[str, type[Agent]] = {}
_ENTRY_POINTS_LOADED = False


@dataclass
class AgentConfig:
    """Settings every agent shares.

    Attributes:
        restrict: ``"topp"`` (default): every max / logsumexp / softmax / normaliser runs over the
            teacher's set A_p(s) (the paper's point); ``"none"``: over the full vocabulary (ablation).
        gamma: discount (the paper: 0.99).
        top_p: re-cut the data's A_p(s) at this p (``None``: keep the annotation's p).
        outside_coef: weight of the outside-mass term added by :meth:`Agent.forward` with
            ``restrict="topp"``: ``E_s[-log pi_S(A_p(s)|s)] = E_s[KL(proj_p pi_S || pi_S)]``, the gap
            between the projected policy the top-p losses train and the full softmax the student
            decodes with. Every top-p loss is invariant to raising the logits outside A_p(s), so
            nothing else in it stops a student from drifting towards tokens the teacher never
            samples. 0 (default, the paper's losses) turns it off; ``benchmarks/RESULTS.md`` reports
            BD with it on.
        outside_samples: the outside mass is estimated without ``[N, V]`` logits: exactly over the
            distinct candidate ids of the batch, plus this many ids drawn uniformly from the rest of
            the vocabulary (importance-weighted; exact when the rest is no larger).
    """

    restrict: str = "topp"
    gamma: float = 0.99
    top_p: float | None = None
    outside_coef: float = 0.0
    outside_samples: int = 1024

    def __post_init__(self):
        if self.restrict not in RESTRICT_MODES:
            raise ConfigError(f"restrict must be one of {', '.join(RESTRICT_MODES)}, got {self.restrict!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.outside_coef < 0:
            raise ConfigError(f"outside_coef must be >= 0, got {self.outside_coef}")
        if self.outside_samples < 1:
            raise ConfigError(f"outside_samples must be >= 1, got {self.outside_samples}")
        if self.top_p is not None:
            from tdrl.actions import validate_top_p

            try:
                validate_top_p(self.top_p)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` over the entries where ``mask`` is True; 0 for rows with no such entry (their
    gradient is 0, not NaN)."""
    any_valid = mask.any(dim, keepdim=True)
    safe = mask | ~any_valid & (torch.arange(mask.shape[dim], device=mask.device) == 0)
    out = x.masked_fill(~safe, float("-inf")).logsumexp(dim)
    return torch.where(any_valid.squeeze(dim), out, torch.zeros_like(out))


def masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over the masked entries of the last dim; ``-inf`` elsewhere."""
    return (x - masked_logsumexp(x, mask).unsqueeze(-1)).masked_fill(~mask, float("-inf"))


@dataclass
class Transitions:
    """The response positions of a batch as N transitions, flattened row-major.

    ``hidden`` holds M >= N states: every state s of a transition and every next state s'. ``cur``
    and ``nxt`` index into it (``nxt`` is -1 where a row has no next position; ``done`` is then True).
    Per-state fields (``cand_*``) are ``[M, ...]``; per-transition fields are ``[N]``.
    """

    hidden: Tensor
    cur: Tensor
    nxt: Tensor
    cand_ids: Tensor
    cand_mask: Tensor
    cand_logprobs: Tensor
    actions: Tensor
    reward: Tensor
    done: Tensor
    action_in_cand: Tensor
    action_logprob: Tensor

    @property
    def n(self) -> int:
        return int(self.cur.shape[0])


@dataclass
class SetLogits:
    """Logits on the action set at every state of a :class:`Transitions` (``[M, S]``, S = K or V),
    the set mask, and the logit of each transition's action (``[N]``) with whether it is in the set."""

    logits: Tensor
    mask: Tensor
    action: Tensor
    action_in_set: Tensor


class Agent(nn.Module):
    """Base class of every agent. Subclasses set ``Config``, ``description`` and implement ``loss``.

    The agent is an ``nn.Module`` holding the student and any extra state (target networks, heads),
    so ``state_dict()`` / ``load_state_dict()`` round-trip all of it. Parameters with
    ``requires_grad=False`` (target networks) are not trained.
    """

    Config: ClassVar[type[AgentConfig]] = AgentConfig
    name: ClassVar[str] = "agent"
    description: ClassVar[str] = ""
    #: on-policy agents train on the student's own episodes; the trainer collects them by default
    on_policy: ClassVar[bool] = False
    #: agents that run the teacher inside ``loss`` (kd-online); the trainer calls ``attach_teacher``
    uses_teacher: ClassVar[bool] = False

    def __init__(self, student: Student, config: AgentConfig | None = None):
        super().__init__()
        self.student = student
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise ConfigError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")

    def attach_teacher(self, teacher) -> None:
        """Give an agent with ``uses_teacher = True`` the teacher (not saved with the agent's state)."""

    # ------------------------------------------------------------------ contract
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss to minimise and named float metrics."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """What the trainer minimises: ``agent.loss(batch)`` plus, with ``restrict="topp"`` and
        ``outside_coef > 0``, ``outside_coef * E_s[-log pi_S(A_p(s)|s)]`` on the same trunk forward
        (:meth:`outside_loss`; metrics ``loss/outside``, ``policy/outside_mass``). ``agent(batch)``
        is this, so DDP / ``accelerate`` can wrap an agent."""
        self._last_transitions = None
        loss, metrics = self.loss(batch)
        t, self._last_transitions = self._last_transitions, None
        if t is not None and self.config.restrict == "topp" and self.config.outside_coef > 0:
            term, mass = self.outside_loss(t)
            loss = loss + self.config.outside_coef * term
            metrics = {**metrics, "loss/outside": term.item(), "policy/outside_mass": mass.item()}
        return loss, metrics

    def outside_loss(self, t: Transitions, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(E_s[-log pi_S(A_p(s)|s)], E_s[pi_S(V minus A_p(s)|s)])`` over the transition states of ``t``.

        ``Z_out(s)`` = the student's ``sum_{a not in A_p(s)} exp(logit)`` is computed exactly over U, the
        distinct candidate ids of the batch (the tokens a drifting student most often rates highly),
        and estimated over the remaining ``V - |U|`` ids from ``outside_samples`` uniform draws scaled by
        ``(V - |U|) / outside_samples`` (all of them, exactly, when there are no more than that).
        Returns ``log(1 + Z_out / Z_A)`` averaged over states, and the implied outside mass.
        """
        hidden = t.hidden[t.cur]
        ids, mask = t.cand_ids[t.cur], t.cand_mask[t.cur]
        weight, bias = self.student.output_weight(), self.student.output_bias()
        vocab = weight.shape[0]
        unique, inverse = torch.unique(ids, return_inverse=True)
        in_set = torch.zeros(ids.shape[0], unique.numel(), device=ids.device).scatter_add_(1, inverse, mask.float()) > 0
        rest = torch.ones(vocab, dtype=torch.bool, device=ids.device)
        rest[unique] = False
        rest_ids = torch.nonzero(rest).squeeze(-1)
        n_rest, samples = rest_ids.numel(), self.config.outside_samples
        if n_rest > samples:
            draw = torch.randint(0, n_rest, (samples,), generator=generator, device="cpu").to(ids.device)
            rest_ids, scale = rest_ids[draw], n_rest / samples
        else:
            scale = 1.0
        logits = column_logits(hidden, weight, bias, torch.cat([unique, rest_ids])).float()
        known, sampled = logits[:, : unique.numel()], logits[:, unique.numel() :]
        log_z_set = masked_logsumexp(known, in_set)
        log_z_out = known.masked_fill(in_set, float("-inf")).logsumexp(-1)
        if sampled.shape[1]:
            log_z_out = torch.logaddexp(log_z_out, sampled.logsumexp(-1) + math.log(scale))
        gap = nn.functional.softplus(log_z_out - log_z_set)  # log(1 + Z_out / Z_A); 0 when nothing is outside
        return gap.mean(), (1.0 - torch.exp(-gap)).mean().detach()

    def after_update(self) -> None:
        """Called by the trainer after each optimiser step (e.g. Polyak target updates)."""

    #: decoding samples from softmax(LM-head logits / decode_temperature); SQL-family agents use alpha
    decode_temperature: float = 1.0

    def policy_logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary logits to decode with (no teacher at inference): the LM head / decode_temperature."""
        return self.student.full_logits(hidden) / self.decode_temperature

    @torch.no_grad()
    def act(self, obs: dict[str, Any], *, greedy: bool = True, generator: torch.Generator | None = None) -> int:
        """One action for an environment observation, from :meth:`policy_logits` masked to A_p(s)."""
        length = int(obs["length"])
        ids = torch.as_tensor(np.asarray(obs["input_ids"])[:length], device=self.student.device).unsqueeze(0)
        hidden = self.student.hidden_states(ids)[0, -1]
        logits = self.policy_logits(hidden)
        cand = torch.as_tensor(np.asarray(obs["cand_ids"]), device=logits.device)
        mask = torch.as_tensor(np.asarray(obs["cand_mask"]), device=logits.device).bool()
        scores = logits[cand].masked_fill(~mask, float("-inf"))
        index = scores.argmax() if greedy else torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
        return int(cand[index])

    # ------------------------------------------------------------------ shared maths
    def transitions(self, batch: dict[str, Tensor], student: Student | None = None) -> Transitions:
        """One trunk forward; the states of all transitions and their successors, flattened."""
        student = student or self.student
        device = student.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        sel = batch["response_mask"].bool()
        has_next = torch.zeros_like(sel)
        has_next[:, 1:] = sel[:, :-1]
        need = sel | has_next
        flat = torch.full(sel.shape, -1, dtype=torch.long, device=device)
        flat[need] = torch.arange(int(need.sum()), device=device)
        next_index = torch.full_like(flat, -1)
        next_index[:, :-1] = flat[:, 1:]
        actions = torch.zeros_like(batch["input_ids"])
        actions[:, :-1] = batch["input_ids"][:, 1:]
        nxt = next_index[sel]
        hidden = student.hidden_states(batch["input_ids"], batch["attention_mask"])
        t = Transitions(
            hidden=hidden[need],
            cur=flat[sel],
            nxt=nxt,
            cand_ids=batch["cand_ids"][need],
            cand_mask=batch["cand_mask"][need].bool(),
            cand_logprobs=batch["cand_logprobs"][need].float(),
            actions=actions[sel],
            reward=batch["reward"][sel].float(),
            done=batch["done"][sel].bool() | (nxt < 0),
            action_in_cand=batch["action_in_cand"][sel].bool(),
            action_logprob=batch["action_logprob"][sel].float(),
        )
        if student is self.student:  # kept for forward()'s outside-mass term on the same trunk forward
            self._last_transitions = t
        return t

    def set_logits(
        self,
        t: Transitions,
        hidden: Tensor | None = None,
        *,
        current_only: bool = False,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> SetLogits:
        """Logits of a head (default: the student's LM head) on the action set of the states of ``t``:
        all M states (``[M, S]``), or only the N transition states (``current_only``, ``[N, S]``).
        ``hidden`` defaults to ``t.hidden`` (pass a target network's to evaluate it instead)."""
        hidden = t.hidden if hidden is None else hidden
        if weight is None:
            weight, bias = self.student.output_weight(), self.student.output_bias()
        rows = t.cur if current_only else slice(None)
        states = hidden[rows]
        if self.config.restrict == "topp":
            logits = gather_logits(states, weight, bias, t.cand_ids[rows])
            action = gather_logits(hidden[t.cur], weight, bias, t.actions.unsqueeze(-1)).squeeze(-1)
            return SetLogits(logits, t.cand_mask[rows], action, t.action_in_cand)
        logits = nn.functional.linear(states, weight, bias)
        current = logits if current_only else logits[t.cur]
        action = current.gather(-1, t.actions.unsqueeze(-1)).squeeze(-1)
        ones = torch.ones_like(logits, dtype=torch.bool)
        return SetLogits(logits, ones, action, torch.ones_like(t.action_in_cand))

    @staticmethod
    def next_value(values: Tensor, t: Transitions) -> Tensor:
        """``V(s')`` per transition from per-state values ``[M]``; 0 where ``done``."""
        v = values[t.nxt.clamp(min=0)]
        return torch.where(t.done, torch.zeros_like(v), v)

    @staticmethod
    def entropy_in_set(logits: Tensor, mask: Tensor) -> Tensor:
        """Mean entropy of ``softmax`` over the set (the ``policy/entropy_in_set`` metric)."""
        logp = masked_log_softmax(logits, mask)
        p = logp.exp()
        return -(p * logp.masked_fill(~mask, 0.0)).sum(-1).mean()


class TargetNetwork:
    """A frozen copy of a module updated by Polyak averaging: ``theta' <- (1 - tau) theta' + tau theta``."""

    @staticmethod
    def make(module: nn.Module) -> nn.Module:
        target = copy.deepcopy(module)
        target.requires_grad_(False)
        return target.eval()

    @staticmethod
    @torch.no_grad()
    def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s.detach(), tau)


# ---------------------------------------------------------------------- registry
def register_agent(name: str):
    """Class decorator: register an :class:`Agent` subclass under ``name``."""

    def decorate(cls: type[Agent]) -> type[Agent]:
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise TypeError(f"@register_agent({name!r}) must decorate an Agent subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"an agent named {name!r} is already registered ({_REGISTRY[name].__module__})")
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
        obj = entry.load()
        if isinstance(obj, type) and issubclass(obj, Agent) and entry.name not in _REGISTRY:
            register_agent(entry.name)(obj)


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


def make_agent(name: str, student: Student, **overrides) -> Agent:
    """Build agent ``name`` with its config defaults updated by ``overrides`` (unknown fields raise)."""
    cls = get_agent(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"agent {name!r} has no setting(s) {', '.join(unknown)}; its settings: {', '.join(sorted(fields))}"
        )
    return cls(student, cls.Config(**overrides))
