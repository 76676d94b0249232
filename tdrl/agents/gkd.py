"""Generalised Knowledge Distillation (Agarwal et al. 2024): a divergence to the teacher on states
from a mixture of offline data and the student's own samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdrl.agents.base import Agent, AgentConfig, masked_log_softmax, register_agent
from tdrl.errors import ConfigError

DIVERGENCES = ("forward", "reverse", "jsd")


def divergences(logp_teacher: torch.Tensor, logp_student: torch.Tensor, mask: torch.Tensor, beta: float):
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


@dataclass
class GKDConfig(AgentConfig):
    """GKD: minimise a divergence D(pi_T^p, pi_S^p)(s) at the batch's states, both policies
    renormalised on A_p(s) (``restrict="none"``: the student normalised over the vocabulary, the sum
    still over A_p(s), where the teacher's probabilities are known):

    * ``divergence="forward"``: KL(pi_T || pi_S) (= word-level KD minus the teacher's entropy);
    * ``"reverse"``: KL(pi_S || pi_T) (mode seeking);
    * ``"jsd"``: beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S (GKD's generalised
      JSD; beta = 0.5 symmetric).

    GKD's lambda (the fraction of on-policy, student-generated sequences) is the trainer's
    ``--online-ratio`` with ``--online-every N``; lambda = 0 (offline only) with the forward KL is KD.
    Defaults (GKD paper / TRL's GKDConfig): divergence jsd, beta 0.5, temperature 1.

    Metrics: ``loss/gkd``, ``gkd/forward_kl``, ``gkd/reverse_kl``, ``policy/entropy_in_set``.
    """

    divergence: str = "jsd"
    beta: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"beta must lie in (0, 1), got {self.beta}")


@register_agent("gkd")
class GKD(Agent):
    Config = GKDConfig
    description = "generalised KD: forward / reverse KL or generalised JSD to the teacher on A_p(s), on- and off-policy"

    def loss(self, batch):
        t = self.transitions(batch)
        q = self.set_logits(t, current_only=True)
        mask = t.cand_mask[t.cur]
        logits = q.logits / self.config.temperature
        student_set = masked_log_softmax(logits, q.mask)
        student = student_set if self.config.restrict == "topp" else student_set.gather(-1, t.cand_ids[t.cur])
        teacher = masked_log_softmax(t.cand_logprobs[t.cur], mask)
        forward, reverse, jsd = divergences(teacher, student, mask, self.config.beta)
        per_state = {"forward": forward, "reverse": reverse, "jsd": jsd}[self.config.divergence]
        loss = per_state.mean()
        metrics = {
            "loss/gkd": loss.item(),
            "gkd/forward_kl": forward.mean().item(),
            "gkd/reverse_kl": reverse.mean().item(),
            "policy/entropy_in_set": self.entropy_in_set(logits, q.mask).item(),
        }
        return loss, metrics
