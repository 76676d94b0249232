"""Collect episodes from a token-generation env as records that offline agents also train on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tdrl.actions import ActionSubset
from tdrl.records import episode_record

__all__ = ["rollout"]

#: observation -> (actions, extras): extras a dict of per-row values (``{}`` for most policies)
Policy = Callable[[dict[str, np.ndarray]], tuple[Any, dict[str, Any]]]


def _act(policy: Policy, obs: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
    """The policy's ``(actions, extras)`` for ``obs``; extras as arrays with one value per row (e.g.
    the log-probs it sampled from, :data:`tdrl.records.ONLINE_FIELDS`)."""
    out = policy(obs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(
            f"a policy returns (actions, extras), extras a dict of per-row values ({{}} if none); "
            f"{type(policy).__name__} returned {type(out).__name__}: return `actions, {{}}`"
        )
    actions, extras = out
    return actions, {k: np.atleast_1d(v) for k, v in extras.items()}


def rollout(env, policy: Policy, n_episodes: int, *, seed: int | None = None) -> list[dict]:
    """Run ``policy`` for ``n_episodes`` complete episodes and return them as records
    (:mod:`tdrl.records`): the same format the offline annotation writes.

    ``env`` is a :class:`TokenGenerationEnv` (possibly wrapped, e.g. by ``gymnasium.make``) or a
    :class:`TokenGenerationVectorEnv`; ``policy`` maps an observation (batched for a vector env) to
    ``(actions, extras)`` (:mod:`tdrl.envs.policies`). ``seed`` seeds the first reset. Each record also
    carries ``return`` (sum of rewards), and, per step, the policy's extras (a dict of per-row values,
    e.g. ``behaviour_logprob``; ``{}`` for most policies). The prompt text comes from the env's
    ``prompt_text()`` (``prompt_text(row)`` for a vector env).
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    base = getattr(env, "unwrapped", env)
    num = getattr(base, "num_envs", None)
    return (
        _rollout_vector(env, base, policy, n_episodes, seed) if num else _rollout_single(env, policy, n_episodes, seed)
    )


class _Trajectory:
    def __init__(self, obs_row: dict[str, np.ndarray], prompt: str):
        self.prompt = prompt
        self.prompt_ids = obs_row["input_ids"][: int(obs_row["prompt_length"])].tolist()
        self.cand_ids, self.cand_logprobs, self.cand_mask = [], [], []
        self.actions, self.action_logprob, self.reward = [], [], []
        self.extras: dict[str, list[float]] = {}

    def add(self, obs_row, action, reward, teacher_logprob, extras: dict[str, float]) -> None:
        for key, value in extras.items():
            self.extras.setdefault(key, []).append(float(value))
        self.cand_ids.append(obs_row["cand_ids"])
        self.cand_logprobs.append(obs_row["cand_logprobs"])
        self.cand_mask.append(obs_row["cand_mask"].astype(bool))
        self.actions.append(int(action))
        self.reward.append(float(reward))
        self.action_logprob.append(float(teacher_logprob))

    def record(self, tokenizer, terminated: bool, final_obs: dict[str, np.ndarray]) -> dict:
        """The episode as a record; ``final_obs`` is the observation of the state after the last action
        (its A_p(s_T), which a truncated episode bootstraps from)."""
        subset = ActionSubset(
            torch.as_tensor(np.stack(self.cand_ids)),
            torch.as_tensor(np.stack(self.cand_logprobs)),
            torch.as_tensor(np.stack(self.cand_mask)),
        )
        final = ActionSubset(
            torch.as_tensor(final_obs["cand_ids"]),
            torch.as_tensor(final_obs["cand_logprobs"]),
            torch.as_tensor(final_obs["cand_mask"].astype(bool)),
        )
        rec = episode_record(
            prompt=self.prompt,
            response=tokenizer.decode(self.actions),
            prompt_ids=self.prompt_ids,
            response_ids=self.actions,
            subset=subset,
            final=final,
            action_logprob=torch.tensor(self.action_logprob),
            reward=torch.tensor(self.reward, dtype=torch.float64),
            terminated=terminated,
        )
        rec["return"] = float(sum(self.reward))
        rec.update(self.extras)
        return rec


def _rollout_single(env, policy: Policy, n_episodes: int, seed: int | None) -> list[dict]:
    base = env.unwrapped
    records = []
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        traj = _Trajectory(obs, base.prompt_text())
        while True:
            action, extras = _act(policy, obs)
            next_obs, reward, terminated, truncated, info = env.step(action)
            traj.add(obs, action, reward, info["teacher_logprob"], {k: np.ravel(v)[0] for k, v in extras.items()})
            obs = next_obs
            if terminated or truncated:
                records.append(traj.record(base.teacher.tokenizer, terminated, next_obs))
                break
    return records


def _rollout_vector(env, base, policy: Policy, n_episodes: int, seed: int | None) -> list[dict]:
    obs, _ = env.reset(seed=seed)
    rows = range(base.num_envs)
    trajs = [_Trajectory({k: v[row] for k, v in obs.items()}, base.prompt_text(row)) for row in rows]
    records: list[dict] = []
    while len(records) < n_episodes:
        actions, extras = _act(policy, obs)
        actions = np.asarray(actions)
        next_obs, reward, terminated, truncated, info = env.step(actions)
        for row in rows:
            if trajs[row] is None:  # this row was autoreset by this step: a new episode starts
                trajs[row] = _Trajectory({k: v[row] for k, v in next_obs.items()}, base.prompt_text(row))
                continue
            row_extras = {k: v[row] for k, v in extras.items()}
            trajs[row].add(
                {k: v[row] for k, v in obs.items()}, actions[row], reward[row], info["teacher_logprob"][row], row_extras
            )
            if terminated[row] or truncated[row]:
                if len(records) < n_episodes:  # next-step autoreset: next_obs still shows this episode's final state
                    final = {k: v[row] for k, v in next_obs.items()}
                    records.append(trajs[row].record(base.teacher.tokenizer, bool(terminated[row]), final))
                trajs[row] = None
        obs = next_obs
    return records
