"""Implicit Q-Learning (Kostrikov et al. 2022), per token as in ILQL (Snell et al. 2023).

Not to be confused with the paper's "IQL" = Inverse soft-Q Learning: that one is ``iqlearn``/``bd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tdrl.agents.base import Agent, AgentConfig, hp
from tdrl.agents.ops import TargetNetwork, detached, expectile_loss
from tdrl.agents.registry import register_agent
from tdrl.models.student import gather_logits


@dataclass
class IQLConfig(AgentConfig):
    """Implicit Q-Learning on the top-p token MDP with three heads on the student's trunk h(s):

    * Q(s, a): a vocabulary-sized linear Q head with a Polyak target copy Q'; only Q(s, a_data) is
      ever evaluated (one gathered row per position). It starts at zero (weights and bias): Q = 0 is
      on the reward's scale (with the default reward log pi_T, Q* = log pi_T <= 0 and V* = 0), so the
      first steps' advantages are 0 and their weights 1 (SFT), not exp(beta * raw logit);
    * V(s): the student's scalar value head (also zero at the start);
    * pi(a|s): the LM head itself, the policy that is decoded: normalised over the whole vocabulary
      (``restrict="mdp"``, default, and ``"none"``), or over A_p(s) (``"set"``, ablation).

    Losses (sum), with u = Q'(s, a) - V(s), over the transitions of the MDP: those whose data token
    lies in A_p(s) (the top-p MDP has no other actions; ``restrict="none"``: every transition):

        L_V  = E[ |tau - 1(u < 0)| u^2 ]                                  (expectile regression)
        L_Q  = E[ 1/2 (Q(s, a) - r - gamma (1 - terminal) V(s'))^2 ]     (V(s') without gradient)
        L_pi = -E[ min(exp(beta u), max_weight) * log pi(a|s) ]          (advantage-weighted regression,
                                                                          u without gradient)

    What runs over A_p(s): which transitions exist, hence the expectile (V(s) is the tau-expectile of
    Q over the data actions inside A_p(s): IQL's in-sample maximum over the MDP's actions), the TD
    targets and the regression; Implicit Q-Learning has no sum or max over actions to restrict. V(s')
    = 0 after EOS; a response cut at the length limit bootstraps V(s_T). A state whose data token lies
    outside A_p(s) (and a final state s_T) gets no V target of its own, yet its predecessor bootstraps
    from its V: the value head's generalisation from other states fills it in (as for sql and cql's
    V(s_T)); ``data/off_support_frac`` says how many such transitions a batch has. With beta -> 0 every weight
    is 1 and L_pi is SFT on the data tokens inside A_p(s). Its fixed point is not the teacher: AWR
    gives pi(a|s) proportional to pi_data(a|s) min(exp(beta A(s, a)), max_weight) (the kit asserts
    this one, by brute force on a Markov teacher).

    Defaults: expectile tau = 0.7, beta = 3.0, max_weight = 100 (Kostrikov et al.); target rate 0.05
    (ours: Kostrikov's 0.005 suits 10^6 steps; in the tens to hundreds of steps of a distillation run
    it leaves Q' near its start: 15% of the way after 32 steps, against 81% at 0.05; the kit's Markov
    check reaches IQL's fixed point to KL 0.035 in 600 steps at 0.05, 0.17 in 3,000 at 0.005);
    ``head_lr_scale`` = 100 (ours, measured): the Q and V heads train at 100x the student's learning
    rate, so they reach the scale of the returns within the run (RESULTS.md).

    Metrics: ``loss/q``, ``loss/v``, ``loss/policy``, ``q/mean``, ``v/mean``, ``adv/mean``,
    ``adv/weight_mean``, ``policy/entropy_in_set``, ``data/off_support_frac``.
    """

    expectile: float = hp(0.7, "expectile tau of the V regression", range="(0, 1)")
    beta: float = hp(3.0, "inverse temperature of the advantage weights exp(beta A)", range=">= 0")
    max_weight: float = hp(100.0, "cap on the advantage weights", range="> 0")
    tau: float = hp(0.05, "Polyak rate of the target Q head", range="(0, 1]")
    head_lr_scale: float = hp(100.0, "learning-rate multiplier of the Q and V heads", range="> 0")


@register_agent("iql")
class IQL(Agent):
    Config = IQLConfig
    description = "Implicit Q-Learning (expectile V, TD Q head, advantage-weighted policy); not the paper's IQL"

    def __init__(self, student, config=None, *, teacher=None):
        super().__init__(student, config, teacher=teacher)
        student.enable_value_head()
        weight = student.output_weight()
        self.q_head = nn.Linear(weight.shape[1], weight.shape[0], bias=True).to(device=weight.device)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.zero_()
        self.target_q_head = TargetNetwork.make(self.q_head)

    def loss(self, t, batch):
        cfg = self.config
        inside = torch.ones_like(t.action_in_set) if cfg.restrict == "none" else t.action_in_set
        h = t.hidden[t.cur]
        actions = t.actions.unsqueeze(-1)
        q = gather_logits(h, self.q_head.weight, self.q_head.bias, actions).squeeze(-1)
        with torch.no_grad():
            q_target = gather_logits(h, self.target_q_head.weight, self.target_q_head.bias, actions).squeeze(-1)
        values = self.student.value(t.hidden)
        v = values[t.cur]
        y = t.reward + cfg.gamma * self.next_value(values.detach(), t)
        pi = self.policy(t, current_only=True)
        logp = pi.action_log_prob()
        adv = (q_target - v).detach()
        weight = torch.exp(cfg.beta * adv).clamp(max=cfg.max_weight)
        if inside.any():
            loss_v = expectile_loss((q_target - v)[inside], cfg.expectile)
            loss_q = 0.5 * (q - y)[inside].pow(2).mean()
            loss_pi = -(weight * logp)[inside].mean()
        else:
            loss_v = loss_q = loss_pi = (q * 0.0).sum() + (v * 0.0).sum() + (logp * 0.0).sum()
        loss = loss_q + loss_v + loss_pi
        metrics = {
            "loss/q": loss_q,
            "loss/v": loss_v,
            "loss/policy": loss_pi,
            "q/mean": q.mean(),
            "v/mean": v.mean(),
            "adv/mean": adv.mean(),
            "adv/weight_mean": weight[inside].mean() if inside.any() else torch.ones(()),
            "policy/entropy_in_set": self.entropy_in_set(pi.logits, pi.mask),
            "data/off_support_frac": 1.0 - t.action_in_set.float().mean(),
        }
        return loss, detached(metrics)

    def heads(self):
        return [self.q_head, self.student.value_head]

    def after_update(self) -> None:
        TargetNetwork.polyak(self.target_q_head, self.q_head, self.config.tau)
