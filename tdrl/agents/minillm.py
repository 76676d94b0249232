"""MiniLLM (Gu et al. 2024): policy gradient on the sequence-level reverse KL to the teacher, on the
student's own samples (collected through the environment by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tdrl.agents.base import Agent, AgentConfig, hp
from tdrl.agents.gkd import divergences, policy_pair
from tdrl.agents.ops import detached
from tdrl.agents.registry import register_agent


@dataclass
class MiniLLMConfig(AgentConfig):
    """Minimise the sequence-level reverse KL to the teacher on the student's own samples:

        J = KL(pi_S || pi_T) = E_{y ~ pi_S}[ sum_t c_t ],   c_t = log pi_S(y_t|s_t) - log pi_T(y_t|s_t),

    i.e. the per-token reward r_t = -c_t = log pi_T - log pi_S, both over the whole vocabulary
    (``log pi_T(y_t|s_t)`` is the env's exact teacher log-prob of any token). With MiniLLM's
    single-step decomposition (the immediate term's gradient computed exactly) the surrogate is

        L = (1 / #sequences) sum_sequences sum_t [ KL(pi_S || pi_T)(s_t) + max(A_t rho_t, A_t clip(rho_t)) ],
        A_t = C_{t+1} - b,   C_{t+1} = sum_{t' > t} c_t'   (cost-to-go after t, 0 at the end),
        rho_t = pi_S(y_t|s_t) / mu(y_t|s_t),   clip to [1 - cliprange, 1 + cliprange] (PPO, as MiniLLM),

    where mu is the behaviour policy the episode was sampled from, stored with the episode
    (``behaviour_logprob``) and c_t uses the student of that time (``student_logprob``), so episodes
    can be reused after the student moved. On fresh episodes rho = 1 and the expected gradient equals
    grad J (tested by enumeration). The single-step term KL(pi_S || pi_T)(s_t) compares the two
    full-vocabulary policies on A_p(s_t) + one outside bucket (exact for the student; the teacher is
    known on A_p(s_t)). Stabilisers, as MiniLLM:

    * ``length_norm`` (default True): C_{t+1} is divided by the number of remaining tokens;
    * ``baseline`` ``"batch_mean"`` (default) subtracts the batch mean of C_{t+1}; ``"none"`` does not;
    * ``teacher_mix`` alpha (MiniLLM: 0.2): episodes are sampled from mu = alpha pi_T + (1 - alpha) pi_S,
      the teacher part renormalised on A_p(s) (:meth:`MiniLLM.behaviour`, which the collection policy
      :class:`tdrl.envs.StudentPolicy` samples from);
    * ``cliprange`` (MiniLLM: 0.2) and ``clip`` (|A_t| <= 10).

    ``restrict="set"`` (ablation) normalises both policies on A_p(s) and leaves tokens outside it out.
    The agent is on-policy (``on_policy = True``): its trainer preset collects student episodes for it
    and trains on them only (``--online-every`` default every 10 steps, ``--online-ratio`` 1).
    Metrics: ``loss/minillm``, ``minillm/kl_step``,
    ``minillm/reverse_kl`` (per-sequence sum of c_t), ``minillm/advantage``, ``minillm/ratio``,
    ``minillm/clipped_frac``, ``policy/entropy_in_set``.
    """

    length_norm: bool = hp(True, "divide the cost-to-go by the number of remaining tokens")
    baseline: str = hp(
        "batch_mean", "batch_mean (subtract the batch mean of the cost-to-go) or none", choices=("batch_mean", "none")
    )
    teacher_mix: float = hp(0.2, "alpha of the teacher-mixed sampling alpha pi_T + (1 - alpha) pi_S", range="[0, 1)")
    cliprange: float = hp(0.2, "PPO clip range of the importance ratio", range="(0, 1)")
    clip: float = hp(10.0, "clip on |advantage|", range="> 0", why="the bound on |advantage|")


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
    on_policy: ClassVar[bool] = True  # preset: online_every 10, online_ratio 1 (base.ON_POLICY_PRESET)

    def behaviour(self, student_probs, teacher_probs):
        """MiniLLM's teacher-mixed sampling: mu = alpha pi_T + (1 - alpha) pi_S, alpha = ``teacher_mix``."""
        alpha = self.config.teacher_mix
        return alpha * teacher_probs + (1.0 - alpha) * student_probs

    def loss(self, t, batch):
        cfg = self.config
        pi = self.policy(t, current_only=True)
        teacher, student, mask = policy_pair(self, t, pi)
        _, kl_step, _ = divergences(teacher, student, mask, 0.5)
        if cfg.restrict == "set":  # set-normalised: tokens outside A_p(s) have no probability
            inside = pi.action_in_set
            slot = (t.cand_ids[t.cur] == t.actions.unsqueeze(-1)) & t.cand_mask[t.cur]
            log_t = (teacher.masked_fill(~mask, 0.0) * slot).sum(-1)
        else:
            inside, log_t = torch.ones_like(pi.action_in_set), t.action_logprob
        log_s = torch.where(inside, pi.action_log_prob(), torch.zeros_like(pi.action))
        fresh = cfg.restrict == "set" or t.student_logprob is None
        old = log_s.detach() if fresh else t.student_logprob
        behaviour = old if fresh or t.behaviour_logprob is None else t.behaviour_logprob
        cost = torch.where(inside, old - log_t, torch.zeros_like(old)).detach()
        future, remaining = segment_suffix_sums(cost, t.last)
        if cfg.length_norm:
            future = future / remaining.clamp(min=1.0)
        if cfg.baseline == "batch_mean":
            future = future - future.mean()
        advantage = future.clamp(-cfg.clip, cfg.clip)
        ratio = torch.exp(log_s - behaviour)
        clipped = ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
        policy_term = torch.maximum(advantage * ratio, advantage * clipped)
        sequences = t.last.sum().clamp(min=1)
        loss = (kl_step + policy_term)[inside].sum() / sequences
        metrics = {
            "loss/minillm": loss,
            "minillm/kl_step": kl_step.mean(),
            "minillm/reverse_kl": cost.sum() / sequences,
            "minillm/advantage": advantage.mean(),
            "minillm/ratio": ratio.mean(),
            "minillm/clipped_frac": (advantage * clipped > advantage * ratio).float().mean(),
            "policy/entropy_in_set": self.entropy_in_set(pi.logits, pi.mask),
        }
        return loss, detached(metrics)
