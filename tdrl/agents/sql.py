"""Soft Q-learning with the teacher as reward oracle, and CQL on top of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdrl.agents.base import Agent, AgentConfig, TargetNetwork, Transitions, masked_logsumexp, register_agent
from tdrl.errors import ConfigError


@dataclass
class SQLConfig(AgentConfig):
    """Soft Q-learning (Haarnoja et al. 2017) on the top-p token MDP; Q = the student's logits.

    ``V(s) = alpha * logsumexp_{a in R(s)} Q(s, a) / alpha`` with R(s) = A_p(s) (or V), and

        L_TD = E[ 1/2 (Q(s, a) - y)^2 ],   y = r(s, a) + gamma * (1 - done) * V_target(s'),

    where r is the teacher reward stored in the data (``logprob`` by default, for which the soft-optimal
    Q of the full MDP is log pi_T) and V_target comes from a Polyak-averaged copy of the student
    (``target="polyak"``, rate ``tau``) or the current network without gradient (``target="none"``).
    The policy is softmax(Q / alpha) on R(s); decoding uses the LM head's logits / alpha.

    Defaults: alpha = 1 (the entropy weight under which the teacher is soft-optimal), gamma = 0.99
    (the paper), tau = 0.01 (ours).

    Metrics: ``loss/q``, ``q/mean`` (Q(s, a) on data), ``v/mean``, ``td/abs_error``, ``policy/entropy_in_set``.
    """

    alpha: float = 1.0
    target: str = "polyak"
    tau: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.target not in ("polyak", "none"):
            raise ConfigError(f"target must be 'polyak' or 'none', got {self.target!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"tau must lie in (0, 1], got {self.tau}")


@register_agent("sql")
class SQL(Agent):
    Config = SQLConfig
    description = "soft Q-learning: Q = student logits, TD to r + gamma * alpha logsumexp_{A_p(s')} Q/alpha"

    def __init__(self, student, config=None):
        super().__init__(student, config)
        self.target_student = TargetNetwork.make(student) if self.config.target == "polyak" else None

    def soft_value(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``alpha * logsumexp(Q / alpha)`` over the set."""
        alpha = self.config.alpha
        return alpha * masked_logsumexp(logits / alpha, mask)

    def td_terms(self, batch, t: Transitions):
        """Set logits, the TD loss and its metrics (shared with CQL)."""
        q = self.set_logits(t)
        values = self.soft_value(q.logits, q.mask)
        if self.target_student is None:
            target_values = values.detach()
        else:
            with torch.no_grad():
                tt = self.transitions(batch, student=self.target_student)
                qt = self.set_logits(
                    tt, weight=self.target_student.output_weight(), bias=self.target_student.output_bias()
                )
                target_values = self.soft_value(qt.logits, qt.mask)
        y = t.reward + self.config.gamma * self.next_value(target_values, t)
        td = q.action - y
        loss = 0.5 * td.pow(2).mean()
        metrics = {
            "loss/q": loss.item(),
            "q/mean": q.action.mean().item(),
            "v/mean": values[t.cur].mean().item(),
            "td/abs_error": td.abs().mean().item(),
            "policy/entropy_in_set": self.entropy_in_set(q.logits[t.cur] / self.config.alpha, q.mask[t.cur]).item(),
        }
        return q, loss, metrics

    def loss(self, batch):
        t = self.transitions(batch)
        _, loss, metrics = self.td_terms(batch, t)
        return loss, metrics

    def after_update(self) -> None:
        if self.target_student is not None:
            TargetNetwork.polyak(self.target_student, self.student, self.config.tau)

    @property
    def decode_temperature(self) -> float:
        return self.config.alpha


@dataclass
class CQLConfig(SQLConfig):
    """Conservative Q-learning (Kumar et al. 2020, the CQL(H) form) on top of :class:`SQLConfig`:

        L = L_TD + cql_alpha * E[ logsumexp_{a in R(s)} Q(s, a) - Q(s, a_data) ],

    pushing Q down on the set and up on the data token. With R(s) = A_p(s) the push-down only
    touches the teacher's plausible tokens. Default cql_alpha = 1.0 (ours; d3rlpy's default
    conservative weight is 5.0 for continuous control).

    Metrics: SQL's plus ``loss/cql`` (total), ``loss/td``, ``cql/gap`` (the bracket above).
    """

    cql_alpha: float = 1.0


@register_agent("cql")
class CQL(SQL):
    Config = CQLConfig
    description = "conservative Q-learning: the SQL TD loss + cql_alpha * (logsumexp_{A_p(s)} Q - Q(s, a_data))"

    def loss(self, batch):
        t = self.transitions(batch)
        q, td_loss, metrics = self.td_terms(batch, t)
        gap = masked_logsumexp(q.logits[t.cur], q.mask[t.cur]) - q.action
        loss = td_loss + self.config.cql_alpha * gap.mean()
        metrics.update({"loss/td": td_loss.item(), "loss/cql": loss.item(), "cql/gap": gap.mean().item()})
        return loss, metrics
