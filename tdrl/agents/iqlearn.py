"""Inverse soft-Q Learning (IQ-Learn, Garg et al. 2021) on the top-p MDP, and Bellman Distill (BD).

In the paper, "IQL" means THIS method; tdrl calls it ``iqlearn`` (and ``iql`` is Implicit Q-Learning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdrl.agents.base import Agent, AgentConfig, masked_logsumexp, register_agent
from tdrl.errors import ConfigError

EXPERT_TERMS = ("token", "topp_mean")


@dataclass
class IQLearnConfig(AgentConfig):
    """IQ-Learn on the top-p MDP, reward-free: the reward is implicit, r_Q(s, a) = Q(s, a) - gamma V(s').

    Q is the student's logits minus their maximum over the set at each state, clipped below at
    ``q_min``; ``V(s) = logsumexp_{a in A_p(s)} Q(s, a)`` (V = 0 at terminal states). Maximise

        J(Q) = E[ phi( F_p Q(s, a) - gamma V(s') ) ] - E[ V(s) - gamma V(s') ],

    phi(x) = x - x^2 / (4 alpha) (the chi^2 regulariser, ``chi2=True``) or phi(x) = x; gradients flow
    through V(s) and V(s'). The linear terms telescope: without chi^2, J = E[log proj_p softmax(Q)(a|s)],
    top-p behaviour cloning; the chi^2 term penalises large implicit rewards r_Q.

    ``expert_term``: ``"token"`` (the paper's equation: Q at the data token; a data token outside
    A_p(s) would give phi(-inf), so such transitions are left out of J and counted in
    ``data/off_support_frac``) or ``"topp_mean"`` (the authors' released code: the masked Q averaged
    over the whole vocabulary, ``sum_{a in A_p(s)} Q(s, a) / |V| - gamma V(s')``, inside phi).

    The max is taken over R(s) = A_p(s) on the sparse path (the paper's code takes it over the whole
    vocabulary, which the sparse path never materialises; with ``restrict="none"`` it does).
    The policy is softmax(Q) on A_p(s); decoding uses the LM head's logits.

    Defaults (the paper): gamma = 0.99, alpha = 0.1, q_min = -10, expert_term = "token".

    Metrics: ``loss/iqlearn`` (= -J), ``iqlearn/expert_term``, ``iqlearn/value_term``, ``iqlearn/chi2``,
    ``reward/implicit_mean``, ``q/mean``, ``v/mean``, ``policy/entropy_in_set``, ``data/off_support_frac``.
    """

    chi2: bool = True
    alpha: float = 0.1
    q_min: float = -10.0
    expert_term: str = "token"

    def __post_init__(self):
        super().__post_init__()
        if self.expert_term not in EXPERT_TERMS:
            raise ConfigError(f"expert_term must be one of {', '.join(EXPERT_TERMS)}, got {self.expert_term!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")


@register_agent("iqlearn")
class IQLearn(Agent):
    Config = IQLearnConfig
    description = "Inverse soft-Q Learning on the top-p MDP (reward-free; the paper's 'IQL')"

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.pow(2) / (4 * self.config.alpha) if self.config.chi2 else x

    def q_values(self, logits: torch.Tensor, mask: torch.Tensor, action: torch.Tensor, cur: torch.Tensor):
        """Q on the set (``[M, S]``) and at the data token (``[N]``): logits minus the set max, clipped."""
        top = logits.masked_fill(~mask, float("-inf")).amax(-1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        q_set = (logits - top.unsqueeze(-1)).clamp(min=self.config.q_min)
        q_action = (action - top[cur]).clamp(min=self.config.q_min)
        return q_set, q_action

    def loss(self, batch):
        cfg = self.config
        t = self.transitions(batch)
        q = self.set_logits(t)
        q_set, q_action = self.q_values(q.logits, q.mask, q.action, t.cur)
        values = masked_logsumexp(q_set, q.mask)
        v, v_next = values[t.cur], self.next_value(values, t)
        if cfg.expert_term == "token":
            include = q.action_in_set
            x = q_action - cfg.gamma * v_next
        else:
            include = torch.ones_like(q.action_in_set)
            mass = (q_set[t.cur] * q.mask[t.cur]).sum(-1) / self.student.vocab_size
            x = mass - cfg.gamma * v_next
        if include.any():
            expert = self.phi(x)[include].mean()
            value_term = (v - cfg.gamma * v_next)[include].mean()
        else:
            expert = value_term = (x * 0.0).sum()
        objective = expert - value_term
        loss = -objective
        metrics = {
            "loss/iqlearn": loss.item(),
            "iqlearn/expert_term": expert.item(),
            "iqlearn/value_term": value_term.item(),
            "iqlearn/chi2": (x[include].pow(2).mean() / (4 * cfg.alpha)).item() if include.any() else 0.0,
            "reward/implicit_mean": x[include].mean().item() if include.any() else 0.0,
            "q/mean": q_action.mean().item(),
            "v/mean": v.mean().item(),
            "policy/entropy_in_set": self.entropy_in_set(q_set[t.cur], q.mask[t.cur]).item(),
            "data/off_support_frac": 1.0 - q.action_in_set.float().mean().item(),
        }
        return loss, metrics


@dataclass
class BDConfig(IQLearnConfig):
    """Bellman Distill (the paper's method) = :class:`IQLearnConfig` with the paper's settings:
    p = 0.8 (``top_p``), gamma = 0.99, chi^2 with alpha = 0.1, q_min = -10, expert_term = "token".
    ``--agent bd`` reproduces the paper; ``--agent iqlearn`` explores around it."""

    top_p: float | None = 0.8


@register_agent("bd")
class BD(IQLearn):
    Config = BDConfig
    description = "Bellman Distill (the paper): top-p IQ-Learn with chi^2, p=0.8, gamma=0.99, alpha=0.1, q_min=-10"
