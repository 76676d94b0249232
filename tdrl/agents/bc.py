"""Behaviour cloning: word-level KD and SFT / SeqKD."""

from __future__ import annotations

from dataclasses import dataclass

from tdrl.agents.base import Agent, AgentConfig, masked_log_softmax, masked_logsumexp, register_agent
from tdrl.errors import ConfigError


@dataclass
class BCConfig(AgentConfig):
    """Behaviour cloning on the data states. R(s) = A_p(s) (``restrict="topp"``) or V (``"none"``).

    * ``mode="kd"`` (word-level KD, the usual distillation baseline): cross-entropy from the teacher
      renormalised on A_p(s) to the student normalised on R(s),
      ``L = E_s[ - sum_{a in A_p(s)} pi_T(a|s) / pi_T(A_p(s)|s) * log pi_S^R(a|s) ]``.
    * ``mode="sft"`` (SeqKD when the data are teacher samples): ``L = E[ -log pi_S^R(a_data|s) ]``;
      with ``restrict="topp"`` a data token outside A_p(s) has no probability under pi_S^R, so such
      positions are left out and counted in ``data/off_support_frac``.

    The policy is pi_S = softmax(student logits); decoding uses the LM head over the full vocabulary.

    Metrics: ``loss/bc``, ``policy/nll_data``, ``policy/kl_teacher`` (KL(pi_T^p || pi_S^R) on A_p),
    ``policy/entropy_in_set``, ``data/off_support_frac``.
    """

    mode: str = "kd"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("kd", "sft"):
            raise ConfigError(f"bc mode must be 'kd' or 'sft', got {self.mode!r}")


@register_agent("bc")
class BC(Agent):
    Config = BCConfig
    description = "behaviour cloning: word-level KD to the teacher on A_p(s) (mode=kd) or SFT/SeqKD (mode=sft)"

    def loss(self, batch):
        t = self.transitions(batch)
        q = self.set_logits(t, current_only=True)
        logp_set = masked_log_softmax(q.logits, q.mask)  # [N, S] student on R(s)
        logp_action = q.action - masked_logsumexp(q.logits, q.mask)
        cand_mask = t.cand_mask[t.cur]
        teacher = masked_log_softmax(t.cand_logprobs[t.cur], cand_mask)  # pi_T renormalised on A_p(s)
        student = logp_set if self.config.restrict == "topp" else logp_set.gather(-1, t.cand_ids[t.cur])
        teacher_p = teacher.exp()
        cross = -(teacher_p * student.masked_fill(~cand_mask, 0.0)).sum(-1)
        teacher_entropy = -(teacher_p * teacher.masked_fill(~cand_mask, 0.0)).sum(-1)
        inside = q.action_in_set
        nll = -logp_action[inside]
        if self.config.mode == "kd":
            loss = cross.mean()
        else:
            loss = nll.mean() if inside.any() else (logp_action * 0.0).sum()
        metrics = {
            "loss/bc": loss.item(),
            "policy/nll_data": nll.mean().item() if inside.any() else float("nan"),
            "policy/kl_teacher": (cross - teacher_entropy).mean().item(),
            "policy/entropy_in_set": self.entropy_in_set(q.logits, q.mask).item(),
            "data/off_support_frac": 1.0 - inside.float().mean().item(),
        }
        return loss, metrics
