"""Soft Q-learning with the teacher as reward oracle, and CQL on top of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdrl.agents.base import Agent, AgentConfig, Policy, Transitions, hp
from tdrl.agents.ops import TargetNetwork, detached, masked_logsumexp
from tdrl.agents.registry import register_agent


@dataclass
class SQLConfig(AgentConfig):
    """Soft Q-learning (Haarnoja et al. 2017) on the top-p token MDP.

    Soft Q-learning's policy is ``pi(a|s) = exp((Q(s, a) - V(s)) / alpha)``. The student's logits z
    are that policy, so with ``restrict="mdp"`` (default) Q is built from the student's policy on
    A_p(s) and a value head ``V_psi(s)`` on its trunk (the duelling form):

        Q(s, a) = alpha * log proj_p pi_S(a|s) + V_psi(s),   pi_S = softmax(z / alpha),
        V(s)    = alpha * logsumexp_{a in A_p(s)} Q(s, a) / alpha = V_psi(s),
        L_TD    = E[ 1/2 (Q(s, a) - y)^2 ],   y = r(s, a) + gamma * (1 - terminal) * V_target(s'),

    over the data transitions whose token lies in A_p(s) (the top-p MDP has no other actions; with
    ``restrict="none"`` over all of them). What runs over A_p(s): the projection proj_p in Q, the
    soft value V(s) (and V(s') of the target), and which transitions exist. V(s') = 0 after EOS; a
    response cut at the length limit bootstraps V_target(s_T) (the released BD code does the same). r is
    the teacher reward stored in the data (``logprob`` by default, for which the soft-optimal Q of the
    full MDP is log pi_T). At the fixed point the student's policy on A_p(s) is the soft-optimal
    policy of the top-p MDP, and nothing ties the logits to the reward's scale: a raw-logit Q would
    regress logits near +20 onto targets near -1.5, and, as the TD loss never looks outside A_p(s),
    leave the whole softmax mass outside the set. The TD loss is invariant to pi_S(A_p(s)|s), so the
    support term (``support_coef``, default 1 here: the weight a full-vocabulary cross-entropy gives
    it) holds the mass on the set; at its optimum (mass 1) it does not conflict with the TD fixed point.
    V_target comes from a Polyak-averaged copy of the student (``target="polyak"``, rate ``tau``) or
    the current value head without gradient (``target="none"``). Decoding uses softmax(z / alpha).

    ``restrict="none"`` is the same over the whole vocabulary; ``restrict="set"`` (ablation) is
    soft Q-learning with raw logits as Q and V = alpha logsumexp_{A_p(s)} Q / alpha.

    ``q_param="logprob"`` is the alternative without a value head: Q = alpha log pi_S (normalised over
    V), V(s) = alpha log pi_S(A_p(s)|s). Its fixed point pins the student's full-vocabulary log-probs on
    A_p(s) to r + gamma V(s') <= log pi_T, so the mass on the set compounds below pi_T(A_p) along the
    horizon; measured worse (test Rouge-L 10.8 against 18.9, RESULTS.md).

    Defaults: alpha = 1 (the entropy weight under which the teacher is soft-optimal), gamma = 0.99
    (the paper), tau = 0.01 (ours), support_coef = 1 (ours), q_param = "duel".

    Metrics: ``loss/q``, ``q/mean`` (Q(s, a) on data), ``v/mean``, ``td/abs_error``,
    ``policy/entropy_in_set``, ``data/off_support_frac``.
    """

    alpha: float = hp(1.0, "entropy weight / decoding temperature (1: the teacher is soft-optimal)", range="> 0")
    target: str = hp(
        "polyak",
        "V(s') from a Polyak target copy (polyak) or the current network without gradient (none)",
        choices=("polyak", "none"),
    )
    tau: float = hp(0.01, "Polyak rate of the target network", range="(0, 1]")
    support_coef: float = hp(
        1.0,
        "weight of the exact support term E_s[-log pi_S(A_p(s)|s)] (holds the mass the TD loss leaves free)",
        range=">= 0",
    )
    q_param: str = hp(
        "duel",
        "duel (Q = alpha log proj_p pi_S + V(s), value head) or logprob (Q = alpha log pi_S over V)",
        choices=("duel", "logprob"),
    )


@register_agent("sql")
class SQL(Agent):
    Config = SQLConfig
    description = "soft Q-learning: Q = alpha log proj_p pi_S + V(s), TD to r + gamma V(s') on the top-p MDP"

    def __init__(self, student, config=None, *, teacher=None):
        super().__init__(student, config, teacher=teacher)
        if self.config.restrict != "set" and self.config.q_param == "duel":
            student.enable_value_head()
        self.target_student = TargetNetwork.make(student) if self.config.target == "polyak" else None

    def heads(self):
        return [self.student.value_head] if self.student.value_head is not None else []

    def soft_value(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``alpha * logsumexp(Q / alpha)`` over the set (0 for a state without one)."""
        return self.config.alpha * masked_logsumexp(q / self.config.alpha, mask)

    def q_values(self, t: Transitions) -> tuple[torch.Tensor, torch.Tensor, Policy]:
        """``(Q(s, a_data) [N], V(s) [M], policy)`` under the configured parametrisation."""
        alpha = self.config.alpha
        if self.config.restrict == "set":
            pi = self.policy(t)  # raw logits: Q = z
            return pi.action, self.soft_value(pi.logits, pi.mask), pi
        pi = self.policy(t, temperature=alpha)
        if self.config.q_param == "logprob":  # Q = alpha log pi_S over V, V = alpha log pi_S(A_p(s)|s)
            return alpha * pi.action_log_prob(), alpha * pi.log_mass_in_set(), pi
        values = self.student.value(t.hidden)
        q_action = alpha * (pi.action - pi.log_z_support[t.cur]) + values[t.cur]
        return q_action, values, pi

    @torch.no_grad()
    def target_values(self, batch, t: Transitions, values: torch.Tensor) -> torch.Tensor:
        """V_target at every state of ``t`` ``[M]``."""
        if self.target_student is None:
            return values.detach()
        tt = self.transitions(batch, student=self.target_student)
        target = self.target_student
        if self.config.restrict != "set" and self.config.q_param == "duel":
            return target.value(tt.hidden)
        alpha = 1.0 if self.config.restrict == "set" else self.config.alpha
        pi = self.policy(tt, tt.hidden, weight=target.output_weight(), bias=target.output_bias(), temperature=alpha)
        if self.config.restrict == "set":
            return self.soft_value(pi.logits, pi.mask)
        return alpha * pi.log_mass_in_set()

    def inside(self, t: Transitions) -> torch.Tensor:
        """The transitions of the MDP: data token in A_p(s) (every transition for ``restrict="none"``)."""
        return torch.ones_like(t.action_in_set) if self.config.restrict == "none" else t.action_in_set

    def td_terms(self, batch, t: Transitions):
        """Q at the data tokens, the TD loss and its metrics (shared with CQL)."""
        q_action, values, pi = self.q_values(t)
        y = t.reward + self.config.gamma * self.next_value(self.target_values(batch, t, values), t)
        inside = self.inside(t)
        td = (q_action - y)[inside]
        loss = 0.5 * td.pow(2).mean() if inside.any() else (q_action * 0.0).sum()
        cur_logits = pi.logits[t.cur] / (1.0 if self.config.restrict != "set" else self.config.alpha)
        metrics = {
            "loss/q": loss,
            "q/mean": q_action.mean(),
            "v/mean": values[t.cur].mean(),
            "td/abs_error": td.abs().mean() if inside.any() else torch.zeros(()),
            "policy/entropy_in_set": self.entropy_in_set(cur_logits, pi.mask[t.cur]),
            "data/off_support_frac": 1.0 - t.action_in_set.float().mean(),
        }
        return q_action, pi, loss, metrics

    def loss(self, t, batch):
        _, _, loss, metrics = self.td_terms(batch, t)
        return loss, detached(metrics)

    def after_update(self) -> None:
        if self.target_student is not None:
            TargetNetwork.polyak(self.target_student, self.student, self.config.tau)

    @property
    def decode_temperature(self) -> float:
        return self.config.alpha


@dataclass
class CQLConfig(SQLConfig):
    """Conservative Q-learning (Kumar et al. 2020, the CQL(H) form) on top of :class:`SQLConfig`:

        L = L_TD + cql_alpha * E[ alpha * logsumexp_{a in V} Q(s, a) / alpha - Q(s, a_data) ],

    pushing Q down on every token and up on the data token, averaged over the same transitions as
    L_TD (data token in A_p(s): the top-p MDP's transitions); the out-of-distribution actions are the
    tokens outside A_p(s). With the duelling Q of ``restrict="mdp"`` (Q extends to every token a of V
    by the same formula) the bracket is exactly ``-alpha * log pi_S(a_data|s)``, the student's
    full-vocabulary cross-entropy on the data token (computed so, from the chunked normaliser).
    ``restrict="set"`` (ablation) takes the log-sum-exp over A_p(s) only, with raw logits as Q.
    Default cql_alpha = 1.0 (ours; d3rlpy's default conservative weight is 5.0 for continuous control).

    Metrics: SQL's plus ``loss/cql`` (total), ``loss/td``, ``cql/gap`` (the bracket above).
    """

    cql_alpha: float = hp(
        1.0,
        "weight of the conservative term alpha lse_V(Q/alpha) - Q(s, a_data)",
        range=">= 0",
        why="a negative weight rewards the over-estimation",
    )


@register_agent("cql")
class CQL(SQL):
    Config = CQLConfig
    description = "conservative Q-learning: the SQL TD loss + cql_alpha * (alpha lse_V Q/alpha - Q(s, a_data))"

    def loss(self, t, batch):
        q_action, pi, td_loss, metrics = self.td_terms(batch, t)
        alpha = self.config.alpha
        if self.config.restrict == "set":
            gap = self.soft_value(pi.logits[t.cur], pi.mask[t.cur]) - q_action
        else:
            gap = -alpha * pi.action_log_prob()  # alpha lse_V(Q / alpha) - Q(s, a_data), Q duelling
        inside = self.inside(t)
        gap = gap[inside].mean() if inside.any() else (gap * 0.0).sum()
        loss = td_loss + self.config.cql_alpha * gap
        metrics.update({"loss/td": td_loss, "loss/cql": loss, "cql/gap": gap})
        return loss, detached(metrics)
