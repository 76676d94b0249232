"""Behaviour cloning: word-level KD and SFT / SeqKD."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdrl.agents.base import Agent, AgentConfig, hp
from tdrl.agents.ops import detached
from tdrl.agents.registry import register_agent


@dataclass
class BCConfig(AgentConfig):
    """Behaviour cloning on the data states; ``pi_S`` is the student's softmax over the whole
    vocabulary (``restrict="mdp"``, default and ``"none"``) or over A_p(s) (``"set"``, ablation).

    * ``mode="kd"`` (word-level KD, the usual distillation baseline): cross-entropy from the top-p
      MDP's teacher target, pi_T renormalised on A_p(s), to the student:
      ``L = E_s[ - sum_{a in A_p(s)} pi_T(a|s) / pi_T(A_p(s)|s) * log pi_S(a|s) ]``.
      Over V this equals the same cross-entropy against the projected student plus
      ``-log pi_S(A_p(s)|s)``: it keeps the student's mass on the set.
    * ``mode="sft"`` (SeqKD when the data are teacher samples): cross-entropy over V,
      ``L = E[ -log pi_S(a_data|s) ]``. With ``restrict="set"`` a data token outside A_p(s) has no
      probability under the set-normalised student, so such positions are left out and counted in
      ``data/off_support_frac``.

    Decoding uses the LM head over the full vocabulary.

    Metrics: ``loss/bc``, ``policy/nll_data`` (over the data tokens the loss uses),
    ``policy/kl_teacher`` (KL from the teacher target on A_p(s) to pi_S), ``policy/entropy_in_set``,
    ``data/off_support_frac``.
    """

    mode: str = hp("kd", "kd (word-level KD on A_p(s)) or sft (SFT / SeqKD on the data tokens)", choices=("kd", "sft"))


@register_agent("bc")
class BC(Agent):
    Config = BCConfig
    description = "behaviour cloning: word-level KD to the teacher on A_p(s) (mode=kd) or SFT/SeqKD (mode=sft)"

    def loss(self, t, batch):
        pi = self.policy(t, current_only=True)
        mask = t.cand_mask[t.cur]
        teacher = self.teacher_targets(t)  # [N, K] pi_T renormalised on A_p(s)
        teacher_p = teacher.exp()
        student = pi.cand_log_probs().masked_fill(~mask, 0.0)
        cross = -(teacher_p * student).sum(-1)
        teacher_entropy = -(teacher_p * teacher.masked_fill(~mask, 0.0)).sum(-1)
        logp_action = pi.action_log_prob()
        used = pi.action_in_set if self.config.restrict == "set" else torch.ones_like(pi.action_in_set)
        nll = -logp_action[used]
        if self.config.mode == "kd":
            loss = cross.mean()
        else:
            loss = nll.mean() if used.any() else (logp_action * 0.0).sum()
        metrics = {
            "loss/bc": loss,
            "policy/nll_data": nll.mean() if used.any() else torch.tensor(float("nan")),
            "policy/kl_teacher": (cross - teacher_entropy).mean(),
            "policy/entropy_in_set": self.entropy_in_set(pi.logits, pi.mask),
            "data/off_support_frac": 1.0 - t.action_in_set.float().mean(),
        }
        return loss, detached(metrics)
