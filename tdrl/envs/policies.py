"""Policies for the token environments: the teacher projected on A_p(s), uniform on A_p(s), and the
student sampling the way its agent collects episodes.

A policy maps an observation (batched for a vector env) to ``(actions, extras)``: the action(s) and a
dict of per-row values it reports about them (``{}`` for most; :class:`StudentPolicy` reports the
log-probabilities it sampled from). :func:`tdrl.envs.rollout` stores the extras in the episode records.
For a single observation ``actions`` is one token id and each extra one value."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TeacherPolicy", "RandomMaskedPolicy", "StudentPolicy", "teacher_probabilities"]


def _sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of ``probs`` ``[N, K]`` (rows sum to 1) by inverse-CDF sampling."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(-1), probs.shape[-1] - 1)


class _CandidatePolicy:
    """Base for policies that choose among an observation's ``cand_*`` (single or batched obs)."""

    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)

    def probabilities(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray | np.integer, dict]:
        batched = obs["cand_ids"].ndim == 2
        cand_ids = np.atleast_2d(obs["cand_ids"])
        probs = self.probabilities({k: np.atleast_2d(obs[k]) for k in ("cand_logprobs", "cand_mask")})
        choice = _sample_rows(probs, self.rng)
        actions = cand_ids[np.arange(cand_ids.shape[0]), choice]
        return (actions if batched else actions[0]), {}


class TeacherPolicy(_CandidatePolicy):
    """Samples from the teacher projected onto A_p(s): ``softmax(cand_logprobs / temperature)`` on
    ``cand_mask``. With ``top_p=1`` and ``top_k >= V`` this is the teacher itself."""

    def __init__(self, temperature: float = 1.0, seed: int | None = None):
        super().__init__(seed)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def probabilities(self, obs):
        logits = np.where(obs["cand_mask"].astype(bool), obs["cand_logprobs"] / self.temperature, -np.inf)
        logits = logits - logits.max(-1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(-1, keepdims=True)


class RandomMaskedPolicy(_CandidatePolicy):
    """Uniform over A_p(s)."""

    def probabilities(self, obs):
        weights = obs["cand_mask"].astype(np.float64)
        return weights / weights.sum(-1, keepdims=True)


class StudentPolicy:
    """The student as an env policy, sampling the way its agent collects episodes: from
    ``agent.behaviour(student_probs, teacher_probs)``, where ``student_probs`` is the decoding policy
    over the whole vocabulary (``softmax(agent.policy_logits / temperature)``, so it may leave A_p(s);
    the env flags it) and ``teacher_probs`` the observation's teacher log-probs renormalised on its
    A_p(s) and scattered to V (0 elsewhere); both ``[B, V]``. The default behaviour is the student's own
    policy; MiniLLM's mixes in the teacher (alpha pi_T + (1 - alpha) pi_S).

    Returns ``(actions, extras)``: extras holds, per row, ``behaviour_logprob`` = log mu(a|s) and
    ``student_logprob`` = log pi_S(a|s) of the chosen tokens, which :func:`~tdrl.envs.rollout` stores in
    the episode records (importance ratios when the episodes are reused).

    ``agent`` is read by duck typing (envs do not import agents, :mod:`tdrl.agents` being a sibling
    stage): any object with ``student`` (a :class:`~tdrl.models.Student`), ``policy_logits(hidden)`` and
    ``behaviour(student_probs, teacher_probs)``, as every :class:`tdrl.agents.Agent` has.
    """

    def __init__(self, agent, seed: int = 0, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.agent, self.temperature = agent, temperature
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, obs: dict) -> tuple[np.ndarray | np.integer, dict[str, np.ndarray]]:
        student = self.agent.student
        ids = torch.as_tensor(np.atleast_2d(obs["input_ids"]), device=student.device)
        lengths = torch.as_tensor(np.atleast_1d(obs["length"]), device=student.device)
        mask = (torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(-1)).long()
        was_training = student.training
        student.eval()
        try:
            hidden = student.hidden_states(ids, mask)
        finally:
            student.train(was_training)
        last = hidden[torch.arange(ids.shape[0]), lengths - 1]
        probs = torch.softmax(self.agent.policy_logits(last).float().cpu() / self.temperature, -1)
        behaviour = self.agent.behaviour(probs, teacher_probabilities(obs, probs.shape[-1]))
        if behaviour.shape != probs.shape:
            raise ValueError(f"agent.behaviour returned shape {tuple(behaviour.shape)}, expected {tuple(probs.shape)}")
        actions = torch.multinomial(behaviour, 1, generator=self.generator)
        extras = {
            "behaviour_logprob": behaviour.gather(-1, actions).squeeze(-1).clamp_min(1e-30).log().numpy(),
            "student_logprob": probs.gather(-1, actions).squeeze(-1).clamp_min(1e-30).log().numpy(),
        }
        actions = actions.squeeze(-1).numpy()
        if np.ndim(obs["length"]):
            return actions, extras
        return actions[0], {k: v[0] for k, v in extras.items()}


def teacher_probabilities(obs: dict, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` float32: the observation's teacher log-probs renormalised on its A_p(s)
    (``cand_mask``) and scattered to the vocabulary, 0 outside A_p(s)."""
    cand = torch.as_tensor(np.atleast_2d(obs["cand_ids"])).long()
    mask = torch.as_tensor(np.atleast_2d(obs["cand_mask"])).bool()
    logits = torch.as_tensor(np.atleast_2d(obs["cand_logprobs"])).float().masked_fill(~mask, float("-inf"))
    return torch.zeros(cand.shape[0], vocab_size).scatter_add_(-1, cand, torch.softmax(logits, -1))
