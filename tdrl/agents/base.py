"""The agent contract: the :class:`Agent` base class (the batch turned into transitions once, the
policy view, the support term, the diagnostics) and the hooks the trainer reads; the settings every
agent shares are :class:`~tdrl.agents.config.AgentConfig`.

An agent owns its maths (``loss``); the trainer owns optimisers, schedules, AMP and logging::

    @register_agent("my-agent")
    class MyAgent(Agent):
        Config = MyConfig                     # dataclass: loss in the docstring, defaults, metric names
        description = "one line for `tdrl agents`"
        def loss(self, t, batch) -> tuple[Tensor, dict[str, Tensor]]: ...

The hooks, each explicit (nothing is read by ``getattr``):

* ``needs_teacher`` (class flag): the agent runs the teacher inside ``loss`` (kd-online). The teacher
  is given at construction, ``Agent(student, config, teacher=teacher)`` (or ``make_agent(name,
  student, teacher=teacher)``; ``tdrl train`` passes it to every agent), read as :attr:`Agent.teacher`,
  and kept out of the module tree: never in ``state_dict``, never moved by ``.to()``, shared (not
  copied) by ``copy.deepcopy``. Without one such an agent refuses to be built.
* :meth:`Agent.behaviour`: the distribution the agent's episodes are sampled from, given the student's
  and the teacher's per state (default: the student's own; MiniLLM mixes in the teacher).
  :class:`tdrl.envs.StudentPolicy` samples from it.
* ``on_policy`` (class flag): the agent trains on its own episodes only. Its trainer preset
  (``trainer_defaults``) then collects them and fills every batch with them (:data:`ON_POLICY_PRESET`,
  unless the agent sets those flags itself), and the kit trains it on them.
* ``trainer_defaults``: the trainer settings the method prescribes (bd: ``lm_coef`` 1); the user's
  flags win.
* ``forward(batch, auxiliary=[...])``: weighted extra loss terms the caller adds
  (:class:`~tdrl.agents.auxiliary.AuxiliaryTerm`, e.g. J_PT), each logged as ``loss/<name>``.

A batch is the collated dict of :func:`tdrl.data.collate`. :meth:`Agent.forward` turns it ONCE into
N transitions (s, a, r, s', terminal) over the response positions, flattened row-major, with one student
trunk forward (:meth:`Agent.transitions`), and passes them to ``loss``. :meth:`Agent.policy` gives
the student's logits on the action set with their normaliser, without building ``[B, T, V]``.

The student's policy is what it decodes with: ``pi_S = softmax`` of its logits over the whole
vocabulary. ``restrict`` says what the teacher's set A_p(s) restricts:

* ``"mdp"`` (default): the top-p MDP. A_p(s) restricts the Bellman backups, V(s) as the soft maximum
  over A_p(s), and the teacher's targets; every student log-probability is normalised over V, exactly,
  by the chunked :func:`~tdrl.models.student.vocab_logsumexp` (no ``[N, V]`` tensor).
* ``"set"`` (ablation: the set-only normaliser): the student's softmax is normalised on A_p(s) too.
  Every loss is then invariant to the logits outside A_p(s) and to a common per-state shift, which
  leaves free the student's mass outside the set: nothing stops it from growing, and decoding (which
  has no teacher) samples there. Measured: from a warm start that mass went 0.75 -> 0.99 in 20 steps.
* ``"none"`` (ablation): no set at all; sums, maxima and normalisers run over V (``[N, V]`` logits).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tdrl.actions import in_set
from tdrl.agents.auxiliary import AuxiliaryTerm, add_auxiliary
from tdrl.agents.config import RESTRICT_MODES, AgentConfig, hp
from tdrl.agents.ops import masked_log_softmax, masked_logsumexp
from tdrl.agents.transitions import Policy, Transitions
from tdrl.errors import ConfigError
from tdrl.models.student import Student, gather_logits, support_summary, vocab_logsumexp

__all__ = [
    "Agent",
    "AgentConfig",
    "AuxiliaryTerm",
    "Transitions",
    "Policy",
    "RESTRICT_MODES",
    "TRAINER_METRIC_GROUPS",
    "ON_POLICY_PRESET",
    "hp",
]

#: Metric groups the trainer logs itself; an agent's metric names never start with these.
TRAINER_METRIC_GROUPS = ("train/", "batch/", "perf/", "eval/", "test/", "test_best/", "rollout/")
#: The trainer preset of an ``on_policy`` agent: collect its episodes every 10 steps, train on them only.
ON_POLICY_PRESET: dict[str, Any] = {"online_every": 10, "online_ratio": 1.0}


class _Shared:
    """Holds an object outside an ``nn.Module``'s tree; ``copy.deepcopy`` shares it (the teacher is
    frozen and large: a copied agent uses the same one)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class Agent(nn.Module):
    """Base class of every agent. Subclasses set ``Config``, ``description`` and implement ``loss``.

    The agent is an ``nn.Module`` holding the student and any extra state (target networks, heads),
    so ``state_dict()`` / ``load_state_dict()`` round-trip all of it. Parameters with
    ``requires_grad=False`` (target networks) are not trained.
    """

    Config: ClassVar[type[AgentConfig]] = AgentConfig
    name: ClassVar[str] = "agent"
    description: ClassVar[str] = ""
    #: the agent trains on its own episodes only (sampled from :meth:`behaviour`): its trainer preset
    #: collects them and fills every batch with them (:data:`ON_POLICY_PRESET`), the kit trains it on them
    on_policy: ClassVar[bool] = False
    #: the agent runs the teacher inside ``loss`` (kd-online): it must be built with ``teacher=``
    needs_teacher: ClassVar[bool] = False
    #: trainer settings this agent's method prescribes (e.g. bd's J_PT weight); the user's flags win
    trainer_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            params = inspect.signature(init).parameters.values()
            if not any(p.name == "teacher" or p.kind is p.VAR_KEYWORD for p in params):
                raise TypeError(
                    f"{cls.__name__}.__init__ must accept the keyword teacher=None and pass it on: "
                    "def __init__(self, student, config=None, *, teacher=None): "
                    "super().__init__(student, config, teacher=teacher)"
                )
        if cls.on_policy:  # the preset follows the flag; what the agent sets itself wins
            cls.trainer_defaults = {**ON_POLICY_PRESET, **cls.trainer_defaults}

    def __init__(self, student: Student, config: AgentConfig | None = None, *, teacher=None):
        super().__init__()
        if not (isinstance(student, nn.Module) and callable(getattr(student, "hidden_states", None))):
            raise ConfigError(
                f"{type(self).__name__} needs a student (tdrl.models.load_student(...)), got {type(student).__name__}"
            )
        self.student = student
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise ConfigError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")
        if self.needs_teacher and teacher is None:
            raise ConfigError(
                f"agent {self.name!r} runs the teacher inside its loss: pass teacher= when building it "
                f"(make_agent({self.name!r}, student, teacher=teacher); tdrl train and build_trainer do this)"
            )
        self._teacher = _Shared(teacher)  # not an nn.Module attribute: never saved, never moved, never copied

    @property
    def teacher(self):
        """The teacher given at construction (``None`` if none was); not part of the agent's state."""
        return self._teacher.value

    def behaviour(self, student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
        """The distribution this agent's episodes are sampled from, per state: ``[B, V]`` rows that
        sum to 1, from the student's decoding policy ``student_probs`` and the teacher's
        ``teacher_probs`` (renormalised on A_p(s), 0 elsewhere), both ``[B, V]``. Default: the
        student's own policy. :class:`tdrl.envs.StudentPolicy` samples from it and records
        ``log mu(a|s)`` as ``behaviour_logprob`` (importance ratios when episodes are reused)."""
        return student_probs

    # ------------------------------------------------------------------ contract
    def loss(self, t: Transitions, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss to minimise and named metrics (0-dim detached tensors, or floats), given the
        batch's transitions ``t`` (built once by :meth:`forward`) and the collated ``batch``."""
        raise NotImplementedError

    def forward(
        self,
        batch: dict[str, Tensor],
        *,
        diagnostics: bool = False,
        auxiliary: Sequence[AuxiliaryTerm] = (),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """What the trainer minimises: ``loss(transitions(batch), batch)`` plus, with
        ``restrict="mdp"`` and ``support_coef > 0``, ``support_coef * E_s[-log pi_S(A_p(s)|s)]``
        (metric ``loss/support``), plus ``term.coef`` times each ``auxiliary`` term's value
        (:class:`~tdrl.agents.auxiliary.AuxiliaryTerm`; metric ``loss/<name>``, unweighted, and the
        term's own metrics: the trainer's J_PT is one, ``loss/lm*``). With ``diagnostics`` (the
        trainer's log steps) it adds ``policy/outside_mass`` (the decoding policy's exact mass outside
        A_p(s)), ``policy/entropy`` (its full-vocabulary entropy) and ``policy/mode_outside`` (how often
        its most likely token lies outside A_p(s)), from one chunked pass without gradient.
        ``agent(batch)`` is this, so DDP / ``accelerate`` wrap an agent and every gradient of a step
        flows through one forward."""
        t = self.transitions(batch)
        loss, metrics = self.loss(t, batch)
        metrics = dict(metrics)
        cfg = self.config
        if cfg.restrict == "mdp" and cfg.support_coef > 0:
            pi = self.policy(t, current_only=True, temperature=self.decode_temperature)
            term = -pi.log_mass_in_set().mean()
            loss = loss + cfg.support_coef * term
            metrics["loss/support"] = term.detach()
        loss = add_auxiliary(self, loss, metrics, auxiliary)
        if diagnostics:
            metrics.update(self.diagnostics(t))
        return loss, metrics

    @torch.no_grad()
    def diagnostics(self, t: Transitions) -> dict[str, Tensor]:
        """``policy/outside_mass`` = E_s[1 - pi_S(A_p(s)|s)], ``policy/entropy`` = E_s[H(pi_S(.|s))] and
        ``policy/mode_outside`` = P_s[argmax pi_S(.|s) not in A_p(s)] of the decoding policy (full
        vocabulary, at ``decode_temperature``) over the transition states."""
        student = self.student
        summary = support_summary(
            t.hidden[t.cur],
            student.output_weight(),
            student.output_bias(),
            t.cand_ids[t.cur],
            t.cand_mask[t.cur],
            scale=1.0 / self.decode_temperature,
            chunk=self.config.vocab_chunk,
        )
        return {
            "policy/outside_mass": summary.outside_mass.mean(),
            "policy/entropy": summary.entropy.mean(),
            "policy/mode_outside": summary.mode_outside.float().mean(),
        }

    def after_update(self) -> None:
        """Called by the trainer after each optimiser step (e.g. Polyak target updates)."""

    def heads(self) -> list[nn.Module]:
        """Freshly initialised modules the agent adds to the student (value heads, Q heads): they train
        at ``head_lr_scale`` times the learning rate (:meth:`param_groups`)."""
        return []

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: the student at ``lr``, :meth:`heads` at
        ``lr * head_lr_scale``; frozen parameters (target networks) are left out."""
        head_ids = {id(p) for head in self.heads() for p in head.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in head_ids], "lr": lr}]
        heads = [p for p in trainable if id(p) in head_ids]
        if heads:
            groups.append({"params": heads, "lr": lr * self.config.head_lr_scale})
        return groups

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
        if greedy:
            return int(cand[scores.argmax()])
        probs = scores.float().softmax(-1).cpu()  # sampled on the CPU: ``generator`` is a CPU generator
        return int(cand.cpu()[torch.multinomial(probs, 1, generator=generator)[0]])

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
        optional = {k: batch[k][sel].float() for k in ("behaviour_logprob", "student_logprob") if k in batch}
        cand_ids, cand_mask = batch["cand_ids"][need], batch["cand_mask"][need].bool()
        cur = flat[sel]
        return Transitions(
            hidden=hidden[need],
            cur=cur,
            nxt=nxt,
            cand_ids=cand_ids,
            cand_mask=cand_mask,
            cand_logprobs=batch["cand_logprobs"][need].float(),
            actions=actions[sel],
            reward=batch["reward"][sel].float(),
            terminal=batch["terminal"][sel].bool() | (nxt < 0),
            last=batch["last"][sel].bool() | (nxt < 0),
            action_in_set=in_set(cand_ids[cur], cand_mask[cur], actions[sel]),
            action_logprob=batch["action_logprob"][sel].float(),
            **optional,
        )

    def policy(
        self,
        t: Transitions,
        hidden: Tensor | None = None,
        *,
        current_only: bool = False,
        temperature: float = 1.0,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Policy:
        """The logits of a head (default: the student's LM head) at all M states of ``t`` (``[M, ...]``),
        or at the N transition states (``current_only``, ``[N, ...]``), divided by ``temperature``,
        with the normaliser ``restrict`` prescribes. ``hidden`` defaults to ``t.hidden`` (pass a
        target network's to evaluate it instead). The full-vocabulary normaliser of the student's own
        head on ``t.hidden`` is computed once per batch (at all M states) and shared by every call."""
        own = hidden is None and weight is None
        hidden = t.hidden if hidden is None else hidden
        if weight is None:
            weight, bias = self.student.output_weight(), self.student.output_bias()
        rows = t.cur if current_only else slice(None)
        index = torch.arange(t.n, device=t.cur.device) if current_only else t.cur
        states, scale = hidden[rows], 1.0 / temperature
        action = gather_logits(hidden[t.cur], weight, bias, t.actions.unsqueeze(-1)).squeeze(-1).float() * scale
        cand_mask = t.cand_mask[rows]
        if self.config.restrict == "none":
            logits = nn.functional.linear(states, weight, bias).float() * scale
            cand = logits.gather(-1, t.cand_ids[rows])
            log_z = logits.logsumexp(-1)
            ones = torch.ones_like(logits, dtype=torch.bool)
            everything = torch.ones_like(t.action_in_set)
            return Policy(
                logits, ones, cand, cand_mask, action, everything, log_z, masked_logsumexp(cand, cand_mask), index
            )
        cand = gather_logits(states, weight, bias, t.cand_ids[rows]).float() * scale
        log_z_set = masked_logsumexp(cand, cand_mask)
        normaliser = None
        if self.config.restrict == "mdp":
            if own:
                normaliser = lambda: self._vocab_log_z(t, temperature)[rows]  # noqa: E731
            else:
                chunk = self.config.vocab_chunk
                normaliser = lambda: vocab_logsumexp(states, weight, bias, scale=scale, chunk=chunk)  # noqa: E731
        return Policy(
            cand, cand_mask, cand, cand_mask, action, t.action_in_set, log_z_set, log_z_set, index, normaliser
        )

    def _vocab_log_z(self, t: Transitions, temperature: float) -> Tensor:
        """``logsumexp_V`` of the student's LM head / temperature at all M states, cached in ``t``."""
        if temperature not in t._log_z:
            student = self.student
            t._log_z[temperature] = vocab_logsumexp(
                t.hidden,
                student.output_weight(),
                student.output_bias(),
                scale=1.0 / temperature,
                chunk=self.config.vocab_chunk,
            )
        return t._log_z[temperature]

    @staticmethod
    def next_value(values: Tensor, t: Transitions) -> Tensor:
        """``V(s')`` per transition from per-state values ``[M]``: 0 where s' is terminal (EOS); a
        truncated response's last transition bootstraps from its final state's value."""
        v = values[t.nxt.clamp(min=0)]
        return torch.where(t.terminal, torch.zeros_like(v), v)

    @staticmethod
    def entropy_in_set(logits: Tensor, mask: Tensor) -> Tensor:
        """Mean entropy of ``softmax`` over the set (the ``policy/entropy_in_set`` metric, detached)."""
        with torch.no_grad():
            logp = masked_log_softmax(logits, mask)
            p = logp.exp()
            return -(p * logp.masked_fill(~mask, 0.0)).sum(-1).mean()

    @staticmethod
    def teacher_targets(t: Transitions, rows=None) -> Tensor:
        """The top-p MDP's teacher target at the transition states: ``log pi_T`` renormalised on
        A_p(s) (``[N, K]``, ``-inf`` outside the set)."""
        rows = t.cur if rows is None else rows
        return masked_log_softmax(t.cand_logprobs[rows], t.cand_mask[rows])
