"""The batched token-generation MDP behind both environments (:mod:`tdrl.envs.token_env`): N rows of
(prompt + response so far), one teacher forward per step with its KV cache kept, the teacher's
reduced action set A_p(s) at every state, rewards (:class:`tdrl.models.Reward`) and what happens
off A_p(s) (``off_support``: allow, penalize or terminate)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from gymnasium import spaces

from tdrl.actions import top_p_subset, validate_top_k, validate_top_p
from tdrl.errors import ConfigError, check_discount
from tdrl.models.teacher import Reward, Teacher, reward_value

__all__ = ["TokenMDP", "OFF_SUPPORT_MODES", "Prompt"]

OFF_SUPPORT_MODES = ("allow", "penalize", "terminate")
Prompt = str | Sequence[int]


class TokenMDP:
    """The batched state machine behind both envs: N rows, one teacher forward per step. The teacher
    computes on its own device; what the envs hand out (observations, rewards, masks) is on the CPU."""

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
        if isinstance(prompts, str):
            raise ConfigError(
                f"prompts is a list of prompts, got one string {prompts[:40]!r}: pass [{prompts[:20]!r}...]"
            )
        if len(prompts) == 0:
            raise ConfigError("the environment needs at least one prompt")
        check_discount(gamma)
        if isinstance(off_support_penalty, bool) or not math.isfinite(float(off_support_penalty)):
            raise ConfigError(f"off_support_penalty must be a finite number, got {off_support_penalty!r}")
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
        self.subset = self._subset()

    def _subset(self):
        """A_p(s) of every row, cut on the teacher's device and kept on the CPU (N x K entries)."""
        return top_p_subset(self.state.logits, top_k=self.top_k, top_p=self.top_p).to("cpu")

    # -------------------------------------------------------------- dynamics
    def check_actions(self, actions: np.ndarray) -> torch.Tensor:
        if actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integer token ids, got dtype {actions.dtype}")
        if np.any(actions < 0) or np.any(actions >= self.vocab_size):
            bad = actions[(actions < 0) | (actions >= self.vocab_size)][0]
            raise ValueError(f"action {bad} is not a token id: valid ids are 0 .. {self.vocab_size - 1}")
        return torch.as_tensor(actions.astype(np.int64))

    def advance(self, actions: torch.Tensor) -> dict[str, np.ndarray]:
        """Take one action per row (CPU ids); return per-row reward, end flags and diagnostics."""
        state, subset = self.state, self.subset
        logits = state.logits
        log_z = torch.logsumexp(logits, dim=-1).cpu()
        action_logit = logits.gather(-1, actions.to(logits.device).unsqueeze(-1)).squeeze(-1).cpu()
        in_support = subset.contains(actions)
        support_mass, support_size = subset.mass(), subset.size()
        by_eos = actions == self.teacher.eos_token_id
        self.teacher.step(state, actions, use_cache=self.kv_cache)
        next_log_z = torch.logsumexp(state.logits, dim=-1).cpu()
        reward = reward_value(self.reward, action_logit, log_z, next_log_z, by_eos, self.gamma)
        off = ~in_support
        if self.off_support != "allow":
            reward = torch.where(off, torch.full_like(reward, self.off_support_penalty), reward)
        terminated = by_eos | off if self.off_support == "terminate" else by_eos
        self.response_lengths += 1
        truncated = ~terminated.numpy() & (self.response_lengths >= self.max_new_tokens)
        self.subset = self._subset()
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
