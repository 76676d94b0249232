"""Generalised Knowledge Distillation (Agarwal et al. 2024): a divergence to the teacher on states
from a mixture of offline data and the student's own samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tdrl.agents.base import Agent, AgentConfig, Policy, Transitions, hp
from tdrl.agents.ops import detached, log1mexp, masked_log_softmax
from tdrl.agents.registry import register_agent

DIVERGENCES = ("forward", "reverse", "jsd")


def divergences(logp_teacher: Tensor, logp_student: Tensor, mask: Tensor, beta: float):
    """Per row over ``mask``: KL(T || S), KL(S || T) and the generalised JSD
    ``beta KL(T || M) + (1 - beta) KL(S || M)`` with ``M = beta T + (1 - beta) S``. Entries outside
    ``mask`` are filled with finite values first, so no 0 * inf reaches a gradient."""
    p_t = logp_teacher.exp().masked_fill(~mask, 0.0)
    p_s = logp_student.exp().masked_fill(~mask, 0.0)
    l_t, l_s = logp_teacher.masked_fill(~mask, 0.0), logp_student.masked_fill(~mask, 0.0)
    log_m = torch.log((beta * p_t + (1 - beta) * p_s).clamp_min(1e-30)).masked_fill(~mask, 0.0)
    forward = (p_t * (l_t - l_s)).sum(-1)
    reverse = (p_s * (l_s - l_t)).sum(-1)
    jsd = beta * (p_t * (l_t - log_m)).sum(-1) + (1 - beta) * (p_s * (l_s - log_m)).sum(-1)
    return forward, reverse, jsd


def partition_log_probs(t: Transitions, pi: Policy, vocab_size: int, temperature: float = 1.0):
    """Teacher and student as distributions over the partition {each a in A_p(s)} + {outside}.

    Both full-vocabulary policies are coarsened to the tokens of A_p(s) and one "outside" bucket (the
    top-p MDP cannot tell the outside tokens apart, and the teacher is known on A_p(s) only). Returns
    ``[N, K + 1]`` log-probs of teacher and student (last column: the bucket) and their mask; ``pi``
    is the student at the transition states (``current_only=True``) built at ``temperature``. The
    student's are exact (the full-vocabulary normaliser). The teacher's are exact at temperature 1
    (its bucket holds 1 - pi_T(A_p(s)), from the cached log-probs); at another temperature its unknown
    tail is taken as spread evenly over the |V \\ A_p(s)| outside tokens. The bucket is left out where
    A_p(s) is the whole vocabulary."""
    mask = t.cand_mask[t.cur]
    teacher = t.cand_logprobs[t.cur].masked_fill(~mask, float("-inf"))
    n_out = (vocab_size - mask.sum(-1)).float()
    has_out = n_out > 0
    log_n = n_out.clamp(min=1).log()
    tail = log_n + (log1mexp(teacher.logsumexp(-1)) - log_n) / temperature  # n_out tokens, rest / n_out each
    teacher = torch.cat([teacher / temperature, tail.masked_fill(~has_out, float("-inf")).unsqueeze(-1)], -1)
    student_out = log1mexp(torch.where(has_out, pi.log_mass_in_set(), torch.full_like(n_out, -1.0)))
    student = torch.cat([pi.cand_log_probs(), student_out.unsqueeze(-1)], -1)
    return teacher.log_softmax(-1), student, torch.cat([mask, has_out.unsqueeze(-1)], -1)


@dataclass
class GKDConfig(AgentConfig):
    """GKD: minimise a divergence D(pi_T, pi_S)(s) at the batch's states, both at ``temperature``
    (it divides the teacher's and the student's logits alike):

    * ``divergence="forward"``: KL(pi_T || pi_S) (word-level KD, minus the teacher's entropy);
    * ``"reverse"``: KL(pi_S || pi_T) (mode seeking);
    * ``"jsd"``: beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S (GKD's generalised
      JSD; beta = 0.5 symmetric).

    With ``restrict="mdp"`` (default) and ``"none"`` both policies are the full-vocabulary ones,
    compared on the partition {each a in A_p(s)} + {everything outside A_p(s)} (see
    :func:`partition_log_probs`): exact on the set, and the student's mass outside it is held to the
    teacher's. With ``restrict="set"`` (ablation) both are renormalised on A_p(s), which leaves the
    student's outside mass free.

    GKD's lambda, the fraction of on-policy (student-generated) sequences, is the trainer's
    ``--online-ratio``; gkd's preset sets it to 0.5 (TRL's ``GKDConfig(lmbda=0.5)``; the GKD paper
    sweeps {0, 0.5, 1}) with a collection every 10 steps (``--online-every``, ours: a collection runs
    the teacher over every generated token). Defaults: divergence jsd, beta 0.5 (GKD / TRL),
    temperature 1 (TRL: 0.9).

    Metrics: ``loss/gkd``, ``gkd/forward_kl``, ``gkd/reverse_kl``, ``policy/entropy_in_set``.
    """

    divergence: str = hp("jsd", "forward (KL(T||S)), reverse (KL(S||T)) or jsd (generalised JSD)", choices=DIVERGENCES)
    beta: float = hp(0.5, "JSD mixture weight of the teacher", range="(0, 1)")
    temperature: float = hp(1.0, "temperature dividing the teacher's and the student's logits", range="> 0")


def policy_pair(agent: Agent, t: Transitions, pi: Policy, temperature: float = 1.0):
    """(teacher, student, mask) log-probs at the transition states for the configured ``restrict``:
    the partition of :func:`partition_log_probs`, or both renormalised on A_p(s) for ``"set"``."""
    if agent.config.restrict == "set":
        mask = t.cand_mask[t.cur]
        teacher = masked_log_softmax(t.cand_logprobs[t.cur] / temperature, mask)
        return teacher, pi.log_probs(), mask
    return partition_log_probs(t, pi, agent.student.vocab_size, temperature)


@register_agent("gkd")
class GKD(Agent):
    Config = GKDConfig
    description = "generalised KD: forward / reverse KL or generalised JSD to the teacher, on- and off-policy"
    trainer_defaults: ClassVar[dict] = {"online_every": 10, "online_ratio": 0.5}

    def loss(self, t, batch):
        tau = self.config.temperature
        pi = self.policy(t, current_only=True, temperature=tau)
        teacher, student, mask = policy_pair(self, t, pi, tau)
        forward, reverse, jsd = divergences(teacher, student, mask, self.config.beta)
        per_state = {"forward": forward, "reverse": reverse, "jsd": jsd}[self.config.divergence]
        loss = per_state.mean()
        metrics = {
            "loss/gkd": loss,
            "gkd/forward_kl": forward.mean(),
            "gkd/reverse_kl": reverse.mean(),
            "policy/entropy_in_set": self.entropy_in_set(pi.logits, pi.mask),
        }
        return loss, detached(metrics)
