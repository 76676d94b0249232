"""The token-generation MDP as a Gymnasium environment, with the teacher as reward and mask oracle.

State: prompt + response so far. Action: the next token (``Discrete(V)``). Transition: append.
The episode terminates at the tokenizer's EOS and is truncated after ``max_new_tokens`` response
tokens. At every state the teacher supplies the reduced action set A_p(s) (its top-k tokens cut to
top-p mass) and a reward for any token (:class:`tdrl.teachers.Reward`).

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

from tdrl.actions import top_p_subset, validate_top_k, validate_top_p
from tdrl.errors import ConfigError
from tdrl.teachers import Reward, Teacher, reward_value

__all__ = ["TokenGenerationEnv", "TokenGenerationVectorEnv", "OFF_SUPPORT_MODES"]

OFF_SUPPORT_MODES = ("allow", "penalize", "terminate")
Prompt = str | Sequence[int]


class _TokenMDP:
    """The batched state machine behind both envs: N rows, one teacher forward per step."""

    def __init__(
        self,
        teacher: Teacher,
        prompts: Sequence[Prompt],
        num_rows: int,
        *,
        top_k: int,
        top_p: float,
        max_new_tokens: int,
        reward: Reward | str,
        off_support: str,
        off_support_penalty: float,
        gamma: float,
        max_prompt_len: int | None,
        kv_cache: bool,
    ):
        self.top_k, self.top_p = validate_top_k(top_k), validate_top_p(top_p)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if off_support not in OFF_SUPPORT_MODES:
            raise ConfigError(f"off_support must be one of {', '.join(OFF_SUPPORT_MODES)}, got {off_support!r}")
        if len(prompts) == 0:
            raise ConfigError("the environment needs at least one prompt")
        self.teacher, self.num_rows = teacher, num_rows
        self.max_new_tokens, self.reward, self.gamma = max_new_tokens, Reward.parse(reward), gamma
        self.off_support, self.off_support_penalty, self.kv_cache = off_support, float(off_support_penalty), kv_cache
        self.vocab_size = teacher.vocab_size
        self.k = min(self.top_k, self.vocab_size)
        self.pool_ids = [teacher.encode_prompt(p) for p in prompts]
        self.pool_texts = [p if isinstance(p, str) else "" for p in prompts]
        self.max_prompt_len = max_prompt_len or max(len(ids) for ids in self.pool_ids)
        for ids in self.pool_ids:
            self._check_prompt_length(ids)
        self.max_len = self.max_prompt_len + max_new_tokens
        if teacher.max_length is not None and self.max_len > teacher.max_length:
            raise ConfigError(
                f"max_prompt_len + max_new_tokens = {self.max_len} exceeds the teacher's context of "
                f"{teacher.max_length} tokens: shorten the prompts or lower max_new_tokens"
            )
        self.state = None
        self.subset = None
        self.response_lengths = np.zeros(num_rows, dtype=np.int64)
        self.prompt_texts = [""] * num_rows
        self.history: list[list[tuple[int, bool]]] = [[] for _ in range(num_rows)]

    # -------------------------------------------------------------- spaces
    def observation_space(self) -> spaces.Dict:
        v, k, length = self.vocab_size, self.k, self.max_len
        return spaces.Dict(
            {
                "input_ids": spaces.Box(0, v - 1, shape=(length,), dtype=np.int64),
                "length": spaces.Box(0, length, shape=(), dtype=np.int64),
                "prompt_length": spaces.Box(0, length, shape=(), dtype=np.int64),
                "cand_ids": spaces.Box(0, v - 1, shape=(k,), dtype=np.int64),
                "cand_logprobs": spaces.Box(-np.inf, 0.0, shape=(k,), dtype=np.float32),
                "cand_mask": spaces.MultiBinary(k),
            }
        )

    # -------------------------------------------------------------- prompts
    def _check_prompt_length(self, ids: Sequence[int]) -> None:
        if len(ids) > self.max_prompt_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the environment allows max_prompt_len={self.max_prompt_len}: "
                "shorten it or build the environment with a larger max_prompt_len"
            )

    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.teacher.encode_prompt(prompt)
        self._check_prompt_length(ids)
        return ids

    def begin(self, rows: Sequence[int], prompt_ids: Sequence[list[int]], texts: Sequence[str]) -> None:
        """Start fresh episodes in ``rows`` (all rows at the first call)."""
        if self.state is None:
            if list(rows) != list(range(self.num_rows)):
                raise ValueError("the first episodes must start in every row, in order")
            self.state = self.teacher.start(prompt_ids)
        else:
            self.teacher.restart(self.state, rows, prompt_ids)
        for row, text in zip(rows, texts):
            self.response_lengths[row] = 0
            self.prompt_texts[row] = text
            self.history[row] = []
        self.subset = top_p_subset(self.state.logits, top_k=self.top_k, top_p=self.top_p)

    # -------------------------------------------------------------- dynamics
    def check_actions(self, actions: np.ndarray) -> torch.Tensor:
        if actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integer token ids, got dtype {actions.dtype}")
        if np.any(actions < 0) or np.any(actions >= self.vocab_size):
            bad = actions[(actions < 0) | (actions >= self.vocab_size)][0]
            raise ValueError(f"action {bad} is not a token id: valid ids are 0 .. {self.vocab_size - 1}")
        return torch.as_tensor(actions.astype(np.int64))

    def advance(self, actions: torch.Tensor) -> dict[str, np.ndarray]:
        """Take one action per row; return per-row reward, end flags and diagnostics."""
        state, subset = self.state, self.subset
        log_z = torch.logsumexp(state.logits, dim=-1)
        action_logit = state.logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        in_support = subset.contains(actions)
        support_mass, support_size = subset.mass(), subset.size()
        by_eos = actions == self.teacher.eos_token_id
        self.teacher.step(state, actions, use_cache=self.kv_cache)
        reward = reward_value(
            self.reward, action_logit, log_z, torch.logsumexp(state.logits, dim=-1), by_eos, self.gamma
        )
        off = ~in_support
        if self.off_support != "allow":
            reward = torch.where(off, torch.full_like(reward, self.off_support_penalty), reward)
        terminated = by_eos | off if self.off_support == "terminate" else by_eos
        self.response_lengths += 1
        truncated = ~terminated.numpy() & (self.response_lengths >= self.max_new_tokens)
        self.subset = top_p_subset(state.logits, top_k=self.top_k, top_p=self.top_p)
        for row, (token, inside) in enumerate(zip(actions.tolist(), in_support.tolist())):
            self.history[row].append((token, inside))
        return {
            "reward": reward.numpy().astype(np.float64),
            "terminated": terminated.numpy(),
            "truncated": truncated,
            "teacher_logprob": (action_logit - log_z).numpy().astype(np.float64),
            "in_support": in_support.numpy(),
            "support_mass": support_mass.numpy().astype(np.float64),
            "support_size": support_size.numpy(),
        }

    # -------------------------------------------------------------- views
    def observation(self) -> dict[str, np.ndarray]:
        """Batched observation ``[N, ...]`` of every row."""
        state, n = self.state, self.num_rows
        input_ids = np.full((n, self.max_len), self.teacher.pad_token_id, dtype=np.int64)
        lengths = state.attention_mask.sum(-1).numpy()
        width = state.input_ids.shape[1]
        ids = state.input_ids.numpy()
        for row in range(n):
            input_ids[row, : lengths[row]] = ids[row, width - lengths[row] :]
        return {
            "input_ids": input_ids,
            "length": lengths.astype(np.int64),
            "prompt_length": state.prompt_lengths.numpy().astype(np.int64),
            "cand_ids": self.subset.ids.numpy().astype(np.int64),
            "cand_logprobs": self.subset.masked_logprobs().numpy().astype(np.float32),
            "cand_mask": self.subset.mask.numpy().astype(np.int8),
        }

    def action_mask(self) -> np.ndarray:
        """int8 ``[N, V]``: 1 on A_p(s)."""
        return self.subset.dense_mask(self.vocab_size).numpy().astype(np.int8)

    def render_row(self, row: int) -> str:
        tok = self.teacher.tokenizer
        n_prompt = int(self.state.prompt_lengths[row])
        seq = self.state.input_ids[row][self.state.attention_mask[row].bool()].tolist()
        parts = []
        for token, inside in self.history[row]:
            text = tok.decode([token])
            parts.append(text if inside else f"[!{text}!]")
        return f"{tok.decode(seq[:n_prompt])}{''.join(parts)}"


class TokenGenerationEnv(gym.Env):
    """One token-generation episode at a time (see the module docstring for spaces and info).

    Args:
        teacher: the :class:`~tdrl.teachers.Teacher` (reward and action-set oracle).
        prompts: the prompt pool: strings (rendered with the chat template) or token-id lists.
        top_k, top_p: the reduced action set A_p(s) (``top_p=1.0``: every top-k token).
        max_new_tokens: truncation length of the response.
        reward: ``logprob`` (default), ``logit`` or ``inverse_soft_q`` (:class:`~tdrl.teachers.Reward`).
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
        self._mdp = _TokenMDP(
            teacher, prompts, 1, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, reward=reward,
            off_support=off_support, off_support_penalty=off_support_penalty, gamma=gamma,
            max_prompt_len=max_prompt_len, kv_cache=kv_cache,
        )  # fmt: skip
        self.action_space = spaces.Discrete(self._mdp.vocab_size)
        self.observation_space = self._mdp.observation_space()
        self.prompt_index = -1
        self._done = True

    @property
    def prompt_pool(self) -> list[list[int]]:
        return self._mdp.pool_ids

    def _obs(self) -> dict[str, np.ndarray]:
        return {key: np.asarray(value[0]) for key, value in self._mdp.observation().items()}

    def _state_info(self) -> dict[str, Any]:
        subset = self._mdp.subset
        return {
            "action_mask": self._mdp.action_mask()[0],
            "prompt_index": self.prompt_index,
            "state_support_mass": float(subset.mass()[0]),
            "state_support_size": int(subset.size()[0]),
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        prompt = (options or {}).get("prompt")
        if prompt is None:
            self.prompt_index = int(self.np_random.integers(len(self._mdp.pool_ids)))
            ids, text = self._mdp.pool_ids[self.prompt_index], self._mdp.pool_texts[self.prompt_index]
        else:
            self.prompt_index = -1
            ids, text = self._mdp.encode(prompt), prompt if isinstance(prompt, str) else ""
        self._mdp.begin([0], [ids], [text])
        self._done = False
        return self._obs(), self._state_info()

    def step(self, action):
        if self._done:
            raise ResetNeeded("the episode has ended (or never started): call reset() before step()")
        actions = self._mdp.check_actions(np.asarray(action).reshape(1))
        out = self._mdp.advance(actions)
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
        return self._mdp.action_mask()[0].astype(bool)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self._mdp.state is None:
            return ""
        return self._mdp.render_row(0)

    def response_text(self) -> str:
        return self.teacher.tokenizer.decode([t for t, _ in self._mdp.history[0]])

    def prompt_text(self) -> str:
        return self._mdp.prompt_texts[0]


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
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.teacher, self.num_envs, self.render_mode = teacher, num_envs, render_mode
        self._mdp = _TokenMDP(
            teacher, prompts, num_envs, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, reward=reward,
            off_support=off_support, off_support_penalty=off_support_penalty, gamma=gamma,
            max_prompt_len=max_prompt_len, kv_cache=kv_cache,
        )  # fmt: skip
        self.single_action_space = spaces.Discrete(self._mdp.vocab_size)
        self.action_space = spaces.MultiDiscrete(np.full(num_envs, self._mdp.vocab_size))
        self.single_observation_space = self._mdp.observation_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self.prompt_index = np.full(num_envs, -1, dtype=np.int64)
        self._started = False

    def _draw(self, row: int) -> tuple[list[int], str]:
        index = int(self._rngs[row].integers(len(self._mdp.pool_ids)))
        self.prompt_index[row] = index
        return self._mdp.pool_ids[index], self._mdp.pool_texts[index]

    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset() got {len(seeds)} seeds for {self.num_envs} sub-envs")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        prompts = (options or {}).get("prompts")
        if prompts is not None and len(prompts) != self.num_envs:
            raise ValueError(f"options['prompts'] needs one prompt per sub-env ({self.num_envs}), got {len(prompts)}")
        ids, texts = [], []
        for row in range(self.num_envs):
            if prompts is None:
                row_ids, text = self._draw(row)
            else:
                self.prompt_index[row] = -1
                row_ids, text = self._mdp.encode(prompts[row]), prompts[row] if isinstance(prompts[row], str) else ""
            ids.append(row_ids)
            texts.append(text)
        self._mdp.state = None
        self._mdp.begin(list(range(self.num_envs)), ids, texts)
        self._needs_reset[:] = False
        self._started = True
        return self._mdp.observation(), self._state_info()

    def _state_info(self) -> dict[str, Any]:
        subset = self._mdp.subset
        every = np.ones(self.num_envs, dtype=bool)
        return {
            "action_mask": self._mdp.action_mask(),
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
            actions[resetting] = self._mdp.subset.ids[torch.as_tensor(resetting), 0].numpy()
        out = self._mdp.advance(self._mdp.check_actions(actions))
        stepped = ~resetting
        reward = np.where(stepped, out["reward"], 0.0)
        terminated = out["terminated"] & stepped
        truncated = out["truncated"] & stepped
        if resetting.any():
            rows = np.flatnonzero(resetting).tolist()
            drawn = [self._draw(row) for row in rows]
            self._mdp.begin(rows, [d[0] for d in drawn], [d[1] for d in drawn])
        self._needs_reset = terminated | truncated
        info = self._state_info()
        for key in ("teacher_logprob", "in_support", "support_mass", "support_size"):
            info[key] = out[key]
            info[f"_{key}"] = stepped
        return self._mdp.observation(), reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """bool ``[N, V]``: True on A_p(s) at each sub-env's current state."""
        return self._mdp.action_mask().astype(bool)

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi" or self._mdp.state is None:
            return None
        return tuple(self._mdp.render_row(row) for row in range(self.num_envs))
