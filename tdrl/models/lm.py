"""A KV-cached causal-LM session: the one way tdrl queries a Hugging Face causal LM.

:class:`LM` wraps a model and its tokenizer and walks sequences forward with the model's KV cache:
:meth:`LM.start` encodes a batch of prompts, :meth:`LM.step` appends one token per row with ONE
one-token forward (N generated tokens cost N small forwards, not N re-encodings), :meth:`LM.restart`
splices fresh prompts into some rows (the vector environment's autoreset), and :meth:`LM.generate`
samples responses. The teacher (:class:`tdrl.models.teacher.Teacher`) and the student at evaluation
both decode through it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tdrl.actions import exact_top_p, top_p_subset
from tdrl.errors import ConfigError
from tdrl.models.placement import check_movable, input_device

__all__ = ["LM", "LMState", "PLAIN_TEMPLATE", "sample_tokens", "model_fingerprint", "tokenizer_fingerprint"]

#: Prompt template for tokenizers without a chat template. ``{prompt}`` is the instruction text.
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class LMState:
    """A batch of partial sequences with the teacher's KV cache (see :meth:`LM.start`).

    Sequences are left-padded: ``input_ids``/``attention_mask`` are ``[B, L]`` and the newest token
    of every row sits in the last column. The state is updated in place by :meth:`LM.step`
    (the KV cache is mutated by the forward pass, so an old snapshot cannot be reused).

    Attributes:
        input_ids: ``[B, L]`` prompt and response tokens so far (left-padded with ``pad_id``).
        attention_mask: ``[B, L]`` 1 on real tokens.
        prompt_lengths: ``[B]`` number of prompt tokens per row.
        logits: ``[B, V]`` float32 logits of the NEXT token at every row.
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


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(
        {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}, sort_keys=True
    )
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]


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


class LM:
    """A causal LM plus its tokenizer, queried with the KV cache.

    Args:
        model: any HF causal LM (or a module with the same ``forward`` contract: ``input_ids``,
            ``attention_mask``, ``position_ids``, ``past_key_values`` / ``cache``, ``use_cache`` in; an
            output with ``.logits`` and the cache out).
        tokenizer: its tokenizer (defines EOS, padding, and the chat template).
        name: a label recorded in fingerprints and logs.
        prompt_template: used by :meth:`encode_prompt` when the tokenizer has no chat template.
        freeze: put the model in eval mode with gradients off (default). ``freeze=False`` lets the same
            KV-cached queries and sampling run on a model that is being trained (a student).

    Every query runs under ``torch.inference_mode`` and returns ordinary tensors.
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
            raise ConfigError(f"the tokenizer of {self.name!r} has no EOS token: set tokenizer.eos_token first")

    def to(self, device: torch.device | str) -> LM:
        check_movable(self.model, self.name)  # a model spread over devices by a device map stays where it is
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs (:func:`~tdrl.models.placement.input_device`)."""
        return input_device(self.model)

    @property
    def vocab_size(self) -> int:
        """Size of the model's output distribution (the action space)."""
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
        elif isinstance(prompt, Sequence) or hasattr(prompt, "tolist"):
            ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {self.vocab_size})")
        else:
            raise TypeError(f"a prompt is a string or a sequence of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty after tokenisation: give at least one token")
        return ids

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

    def start(self, prompts: Sequence[str | Sequence[int]]) -> LMState:
        """Encode a batch of prompts (strings are rendered, id lists taken verbatim) and return a
        :class:`LMState` holding the KV cache and the logits of the first response token."""
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
        return LMState(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_lengths=attention_mask.sum(-1),
            logits=out.logits[:, -1].float().clone(),  # cloned outside inference mode: an ordinary tensor
            cache=_output_cache(out),
        )

    def step(self, state: LMState, tokens: Tensor | Sequence[int], *, use_cache: bool = True) -> LMState:
        """Append one token per row (``tokens`` ``[B]``) with ONE cached forward; updates ``state``
        in place (and returns it) with the logits of the following token.

        ``use_cache=False`` re-encodes every whole sequence instead (the naive baseline the
        benchmarks compare against, and a fallback for models whose cache misbehaves).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()  # ids and masks live on the CPU
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

    def restart(self, state: LMState, rows: Sequence[int], prompts: Sequence[str | Sequence[int]]) -> LMState:
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
        """Responses (token ids, EOS included when reached) with the KV cache.

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
    if generator is not None:  # the draw happens where the generator lives (usually the CPU)
        logits = logits.to(generator.device)
    if top_p >= 1.0 and top_k >= logits.shape[-1]:  # plain sampling: no top-k, and no sort at all
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
    if top_k >= logits.shape[-1]:
        subset = exact_top_p(logits / temperature, top_p)
    else:
        subset = top_p_subset(logits / temperature, top_k=top_k, top_p=top_p)
    probs = subset.masked_logprobs().exp()
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return subset.ids.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
