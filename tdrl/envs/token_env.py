"""The token-generation MDP as a Gymnasium environment, with the teacher as reward and mask oracle.

State: prompt + response so far. Action: the next token (``Discrete(V)``). Transition: append.
The episode terminates at the tokenizer's EOS and is truncated after ``max_new_tokens`` response
tokens. At every state the teacher supplies the reduced action set A_p(s) (its top-k tokens cut to
top-p mass) and a reward for any token (:class:`tdrl.models.Reward`).

Observation (a ``Dict`` of fixed shapes, so vector envs batch; L = max_prompt_len + max_new_tokens,
K = min(top_k, V)):

==================  ==================  =========================================================
key                 space               meaning
==================  ==================  =========================================================
``input_ids``       Box int64 ``[L]``   prompt + response so far, RIGHT-padded with the pad id
``length``          Box int64 ``[]``    number of real tokens in ``input_ids``
``prompt_length``   Box int64 ``[]``    number of prompt tokens (the response starts there)
``cand_ids``        Box int64 ``[K]``   A_p(s) candidates in descending teacher probability
``cand_logprobs``   Box float32 ``[K]`` teacher log-probs; ``-inf`` outside A_p(s)
``cand_mask``       MultiBinary ``[K]`` 1 on A_p(s)
==================  ==================  =========================================================

The mask is also offered as ``info["action_mask"]`` (int8 ``[V]``, Gymnasium's convention) and by
:meth:`TokenGenerationEnv.action_masks` (bool ``[V]``, sb3-contrib's MaskablePPO convention).

``info`` after a step describes the action just taken: ``teacher_logprob`` (log pi_T(a|s)),
``in_support`` (a in A_p(s)), ``support_mass`` (pi_T(A_p(s)|s)), ``support_size`` (|A_p(s)|); and
``action_mask`` for the NEXT state. Any token id is a legal move (the teacher scores every token);
what happens off A_p(s) is set by ``off_support``:

* ``"allow"`` (default): the teacher's reward as usual, flagged by ``in_support=False``;
* ``"penalize"``: reward = ``off_support_penalty``, the episode goes on;
* ``"terminate"``: reward = ``off_support_penalty`` and the episode terminates.

An action id outside ``[0, V)`` raises ``ValueError`` (a bug in the caller, not a move).

The teacher keeps its KV cache across steps (one one-token forward per step); ``kv_cache=False``
re-encodes the whole prefix every step (the naive baseline for benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from tdrl.envs.mdp import OFF_SUPPORT_MODES, Prompt, TokenMDP
from tdrl.errors import ConfigError
from tdrl.models.teacher import Reward, Teacher

__all__ = ["TokenGenerationEnv", "TokenGenerationVectorEnv", "OFF_SUPPORT_MODES"]


class TokenGenerationEnv(gym.Env):
    """One token-generation episode at a time (see the module docstring for spaces and info).

    Args:
        teacher: the :class:`~tdrl.models.Teacher` (reward and action-set oracle).
        prompts: the prompt pool: strings (rendered with the chat template) or token-id lists.
        top_k, top_p: the reduced action set A_p(s) (``top_p=1.0``: every top-k token).
        max_new_tokens: truncation length of the response.
        reward: ``logprob`` (default), ``logit`` or ``inverse_soft_q`` (:class:`~tdrl.models.Reward`).
        off_support: ``allow`` (default), ``penalize`` or ``terminate``.
        off_support_penalty: reward of an off-support action unless ``off_support="allow"`` (-10,
            the paper's q_min).
        gamma: discount used by the ``inverse_soft_q`` reward.
        max_prompt_len: width reserved for prompts in ``input_ids`` (default: the longest prompt).
        kv_cache: keep the teacher's KV cache across steps (default) or re-encode every step.
        render_mode: ``None`` or ``"ansi"`` (prompt and response text, off-support tokens as ``[!tok!]``).

    ``reset(seed=..., options={"prompt": str | token ids})`` draws a prompt from the pool with the
    env's seeded RNG, or takes the given one.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        teacher: Teacher,
        prompts: Sequence[Prompt],
        *,
        top_k: int = 64,
        top_p: float = 0.8,
        max_new_tokens: int = 64,
        reward: Reward | str = "logprob",
        off_support: str = "allow",
        off_support_penalty: float = -10.0,
        gamma: float = 0.99,
        max_prompt_len: int | None = None,
        kv_cache: bool = True,
        render_mode: str | None = None,
    ):
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.teacher = teacher
        self.render_mode = render_mode
        #: the :class:`~tdrl.envs.mdp.TokenMDP` behind the env (both envs share its logic); public, read-only use
        self.mdp = TokenMDP(
            teacher,
            prompts,
            1,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            reward=reward,
            off_support=off_support,
            off_support_penalty=off_support_penalty,
            gamma=gamma,
            max_prompt_len=max_prompt_len,
            kv_cache=kv_cache,
        )
        self.action_space = spaces.Discrete(self.mdp.vocab_size)
        self.observation_space = self.mdp.observation_space()
        self.prompt_index = -1
        self._done = True

    @property
    def prompt_pool(self) -> list[list[int]]:
        return self.mdp.pool_ids

    def _obs(self) -> dict[str, np.ndarray]:
        return {key: np.asarray(value[0]) for key, value in self.mdp.observation().items()}

    def _state_info(self) -> dict[str, Any]:
        subset = self.mdp.subset
        return {
            "action_mask": self.mdp.action_mask()[0],
            "prompt_index": self.prompt_index,
            "state_support_mass": float(subset.mass()[0]),
            "state_support_size": int(subset.size()[0]),
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        _check_options(options, {"prompt"})
        prompt = (options or {}).get("prompt")
        if prompt is None:
            self.prompt_index = int(self.np_random.integers(len(self.mdp.pool_ids)))
            ids, text = self.mdp.pool_ids[self.prompt_index], self.mdp.pool_texts[self.prompt_index]
        else:
            self.prompt_index = -1
            ids, text = self.mdp.encode(prompt), prompt if isinstance(prompt, str) else ""
        self.mdp.begin([0], [ids], [text])
        self._done = False
        return self._obs(), self._state_info()

    def step(self, action):
        if self._done:
            raise ResetNeeded("the episode has ended (or never started): call reset() before step()")
        actions = self.mdp.check_actions(np.asarray(action).reshape(1))
        out = self.mdp.advance(actions)
        terminated, truncated = bool(out["terminated"][0]), bool(out["truncated"][0])
        self._done = terminated or truncated
        info = self._state_info()
        info.update(
            teacher_logprob=float(out["teacher_logprob"][0]),
            in_support=bool(out["in_support"][0]),
            support_mass=float(out["support_mass"][0]),
            support_size=int(out["support_size"][0]),
        )
        return self._obs(), float(out["reward"][0]), terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """bool ``[V]``: True on A_p(s) at the current state (sb3-contrib MaskablePPO)."""
        return self.mdp.action_mask()[0].astype(bool)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self.mdp.state is None:
            return ""
        return self.mdp.render_row(0)

    def response_text(self) -> str:
        return self.teacher.tokenizer.decode([t for t, _ in self.mdp.history[0]])

    def prompt_text(self) -> str:
        """The current episode's prompt as text (``""`` for a prompt given as token ids)."""
        return self.mdp.prompt_texts[0]


class TokenGenerationVectorEnv(VectorEnv):
    """N token-generation episodes stepped together: ONE batched teacher forward per step.

    Same arguments as :class:`TokenGenerationEnv`, plus ``num_envs``. Autoreset follows Gymnasium's
    default ``NEXT_STEP`` mode: when sub-env i terminates or truncates at step t, the call at t+1
    ignores its action, starts a new prompt for it (spliced into the shared KV cache) and returns the
    new first observation with reward 0 and both flags False. ``reset(seed=s)`` seeds sub-env i with
    ``s + i``, so sub-env i draws the same prompts as a :class:`TokenGenerationEnv` reset with ``s + i``.
    ``options={"prompts": [...]}`` sets one prompt per sub-env. Infos are Gymnasium vector dicts:
    arrays ``[N, ...]`` with ``_key`` masks.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        teacher: Teacher,
        prompts: Sequence[Prompt],
        num_envs: int = 1,
        *,
        top_k: int = 64,
        top_p: float = 0.8,
        max_new_tokens: int = 64,
        reward: Reward | str = "logprob",
        off_support: str = "allow",
        off_support_penalty: float = -10.0,
        gamma: float = 0.99,
        max_prompt_len: int | None = None,
        kv_cache: bool = True,
        render_mode: str | None = None,
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.teacher, self.num_envs, self.render_mode = teacher, num_envs, render_mode
        self.mdp = TokenMDP(
            teacher,
            prompts,
            num_envs,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            reward=reward,
            off_support=off_support,
            off_support_penalty=off_support_penalty,
            gamma=gamma,
            max_prompt_len=max_prompt_len,
            kv_cache=kv_cache,
        )
        self.single_action_space = spaces.Discrete(self.mdp.vocab_size)
        self.action_space = spaces.MultiDiscrete(np.full(num_envs, self.mdp.vocab_size))
        self.single_observation_space = self.mdp.observation_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self.prompt_index = np.full(num_envs, -1, dtype=np.int64)
        self._started = False

    def _draw(self, row: int) -> tuple[list[int], str]:
        index = int(self._rngs[row].integers(len(self.mdp.pool_ids)))
        self.prompt_index[row] = index
        return self.mdp.pool_ids[index], self.mdp.pool_texts[index]

    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset() got {len(seeds)} seeds for {self.num_envs} sub-envs")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        _check_options(options, {"prompts"})
        prompts = (options or {}).get("prompts")
        if prompts is not None and len(prompts) != self.num_envs:
            raise ValueError(f"options['prompts'] needs one prompt per sub-env ({self.num_envs}), got {len(prompts)}")
        ids, texts = [], []
        for row in range(self.num_envs):
            if prompts is None:
                row_ids, text = self._draw(row)
            else:
                self.prompt_index[row] = -1
                row_ids, text = self.mdp.encode(prompts[row]), prompts[row] if isinstance(prompts[row], str) else ""
            ids.append(row_ids)
            texts.append(text)
        self.mdp.state = None
        self.mdp.begin(list(range(self.num_envs)), ids, texts)
        self._needs_reset[:] = False
        self._started = True
        return self.mdp.observation(), self._state_info()

    def _state_info(self) -> dict[str, Any]:
        subset = self.mdp.subset
        every = np.ones(self.num_envs, dtype=bool)
        return {
            "action_mask": self.mdp.action_mask(),
            "_action_mask": every,
            "prompt_index": self.prompt_index.copy(),
            "_prompt_index": every,
            "state_support_mass": subset.mass().numpy().astype(np.float64),
            "_state_support_mass": every,
            "state_support_size": subset.size().numpy(),
            "_state_support_size": every,
        }

    def step(self, actions):
        if not self._started:
            raise ResetNeeded("call reset() before step()")
        actions = np.asarray(actions).reshape(self.num_envs).copy()
        resetting = self._needs_reset.copy()
        if resetting.any():  # ignored actions: any valid token keeps the batched forward uniform
            actions[resetting] = self.mdp.subset.ids[torch.as_tensor(resetting), 0].numpy()
        out = self.mdp.advance(self.mdp.check_actions(actions))
        stepped = ~resetting
        reward = np.where(stepped, out["reward"], 0.0)
        terminated = out["terminated"] & stepped
        truncated = out["truncated"] & stepped
        if resetting.any():
            rows = np.flatnonzero(resetting).tolist()
            drawn = [self._draw(row) for row in rows]
            self.mdp.begin(rows, [d[0] for d in drawn], [d[1] for d in drawn])
        self._needs_reset = terminated | truncated
        info = self._state_info()
        for key in ("teacher_logprob", "in_support", "support_mass", "support_size"):
            info[key] = out[key]
            info[f"_{key}"] = stepped
        return self.mdp.observation(), reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """bool ``[N, V]``: True on A_p(s) at each sub-env's current state."""
        return self.mdp.action_mask().astype(bool)

    def prompt_text(self, row: int) -> str:
        """The prompt of sub-env ``row``'s current episode as text (``""`` for a prompt given as token
        ids). After an autoreset it is the new episode's prompt."""
        if not 0 <= row < self.num_envs:
            raise IndexError(f"row {row} is not a sub-env: valid rows are 0 .. {self.num_envs - 1}")
        return self.mdp.prompt_texts[row]

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi" or self.mdp.state is None:
            return None
        return tuple(self.mdp.render_row(row) for row in range(self.num_envs))


def _check_options(options: dict | None, known: set[str]) -> None:
    """``reset(options=...)`` takes only the keys the env reads (a misspelt key would be ignored)."""
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise ConfigError(f"reset options {unknown} are not read by this env: it takes {sorted(known)}")
