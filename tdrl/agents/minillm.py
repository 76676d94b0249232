"""MiniLLM (Gu et al. 2024): policy gradient on the sequence-level reverse KL to the teacher, on the
student's own samples (collected through the environment by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tdrl.agents.base import Agent, AgentConfig, masked_log_softmax, register_agent
from tdrl.agents.gkd import divergences
from tdrl.errors import ConfigError


@dataclass
class MiniLLMConfig(AgentConfig):
    """Minimise the sequence-level reverse KL on the top-p MDP (policies normalised on R(s) = A_p(s)):

        J = KL(pi_S || pi_T) = E_{y ~ pi_S}[ sum_t c_t ],   c_t = log pi_S(y_t|s_t) - log pi_T(y_t|s_t),

    i.e. the per-token reward r_t = -c_t = log pi_T - log pi_S. With MiniLLM's single-step
    decomposition (the immediate term's gradient computed exactly over the set) the surrogate is

        L = (1 / #sequences) sum_sequences sum_t [ KL(pi_S || pi_T)(s_t) + sg(A_t) log pi_S(y_t|s_t) ],
        A_t = w_t * (C_{t+1} - b),   C_{t+1} = sum_{t' > t} c_t'   (cost-to-go after t, 0 at the end),

    whose expected gradient equals grad J (tested by enumeration). Stabilisers, as MiniLLM:

    * ``length_norm`` (default True): C_{t+1} is divided by the number of remaining tokens;
    * ``baseline`` ``"batch_mean"`` (default) subtracts the batch mean of C_{t+1}; ``"none"`` does not;
    * ``teacher_mix`` alpha (MiniLLM: 0.2): episodes are sampled from alpha pi_T + (1 - alpha) pi_S
      (the trainer's collection policy does this) and each token's term is importance-weighted by
      w_t = pi_S / (alpha pi_T + (1 - alpha) pi_S), clipped at ``max_weight``;
    * ``clip`` (default 10): |A_t| is clipped.

    The agent is on-policy: the trainer collects student episodes for it (``--online-every``,
    default every 10 steps, ``--online-ratio`` 1). Metrics: ``loss/minillm``, ``minillm/kl_step``,
    ``minillm/reverse_kl`` (per-sequence sum of c_t), ``minillm/advantage``, ``minillm/weight``,
    ``policy/entropy_in_set``.
    """

    length_norm: bool = True
    baseline: str = "batch_mean"
    teacher_mix: float = 0.2
    max_weight: float = 2.0
    clip: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in ("batch_mean", "none"):
            raise ConfigError(f"baseline must be 'batch_mean' or 'none', got {self.baseline!r}")
        if not 0.0 <= self.teacher_mix < 1.0:
            raise ConfigError(f"teacher_mix must lie in [0, 1), got {self.teacher_mix}")
        if self.restrict != "topp":
            raise ConfigError("minillm needs the teacher's probabilities on the whole action set: use restrict=topp")


def segment_suffix_sums(values: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For transitions flattened row-major with ``done`` at each sequence's end: the sum of
    ``values`` strictly after each position within its sequence, and the count of those positions."""
    n = values.shape[0]
    total = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])  # sum from t to the end of the batch
    index = torch.arange(n, device=values.device)
    ends = torch.where(done, index, torch.full_like(index, n))
    seg_end = torch.flip(torch.cummin(torch.flip(ends, [0]), 0).values, [0]).clamp(max=n - 1)
    after_end = torch.where(seg_end + 1 < n, total[(seg_end + 1).clamp(max=n - 1)], torch.zeros_like(total))
    after_t = torch.where(index + 1 < n, total[(index + 1).clamp(max=n - 1)], torch.zeros_like(total))
    return after_t - after_end, (seg_end - index).to(values.dtype)


@register_agent("minillm")
class MiniLLM(Agent):
    Config = MiniLLMConfig
    description = "MiniLLM: policy gradient on the sequence-level reverse KL, on the student's own samples"
    on_policy: ClassVar[bool] = True

    def loss(self, batch):
        cfg = self.config
        t = self.transitions(batch)
        q = self.set_logits(t, current_only=True)
        mask = t.cand_mask[t.cur]
        student = masked_log_softmax(q.logits, q.mask)
        teacher = masked_log_softmax(t.cand_logprobs[t.cur], mask)
        _, kl_step, _ = divergences(teacher, student, mask, 0.5)
        inside = q.action_in_set
        log_s = torch.where(
            inside,
            q.action - torch.logsumexp(q.logits.masked_fill(~q.mask, float("-inf")), -1),
            torch.zeros_like(q.action),
        )
        slot = (t.cand_ids[t.cur] == t.actions.unsqueeze(-1)) & mask
        log_t = torch.where(inside, (teacher.masked_fill(~mask, 0.0) * slot).sum(-1), torch.zeros_like(log_s))
        cost = (log_s - log_t).detach()
        future, remaining = segment_suffix_sums(cost, t.done)
        if cfg.length_norm:
            future = future / remaining.clamp(min=1.0)
        if cfg.baseline == "batch_mean":
            future = future - future.mean()
        weight = torch.ones_like(future)
        if cfg.teacher_mix > 0:
            p_s, p_t = log_s.detach().exp(), log_t.exp()
            weight = (p_s / (cfg.teacher_mix * p_t + (1 - cfg.teacher_mix) * p_s)).clamp(max=cfg.max_weight)
        advantage = (weight * future).clamp(-cfg.clip, cfg.clip)
        sequences = t.done.sum().clamp(min=1)
        terms = weight * kl_step + advantage * log_s
        loss = terms[inside].sum() / sequences
        metrics = {
            "loss/minillm": loss.item(),
            "minillm/kl_step": kl_step.mean().item(),
            "minillm/reverse_kl": (cost.sum() / sequences).item(),
            "minillm/advantage": advantage.mean().item(),
            "minillm/weight": weight.mean().item(),
            "policy/entropy_in_set": self.entropy_in_set(q.logits, q.mask).item(),
        }
        return loss, metrics
