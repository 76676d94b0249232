"""The student: an HF causal LM whose LM-head logits are an agent's Q-values or policy logits.

The sparse path never builds a ``[B, T, V]`` tensor: :meth:`Student.hidden_states` runs the decoder
trunk only, and :func:`gather_logits` computes logits for the candidate ids alone
(``logit(s, a) = w_a . h(s) + b_a``): one ``[R, U]`` product with the U distinct candidate ids of the
batch (U is a few thousand where V is 49K), gathered per state.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tdrl.actions import in_set
from tdrl.errors import ConfigError, ModelNotFoundError
from tdrl.models.cuts import from_teacher_layers
from tdrl.models.hub import check_model_directory, resolve_name
from tdrl.models.lora import ADAPTER_CONFIG, enable_gradient_checkpointing, head_weight, load_adapter_model
from tdrl.models.tiny import tiny_student_model

__all__ = [
    "Student",
    "gather_logits",
    "column_logits",
    "vocab_logsumexp",
    "vocab_summary",
    "VocabSummary",
    "support_summary",
    "SupportSummary",
    "VOCAB_CHUNK",
    "VALUE_HEAD_FILE",
    "load_student",
    "from_teacher_layers",  # tdrl.models.cuts
]

#: Vocabulary columns per chunk of the full-vocabulary normaliser: the peak extra memory is
#: ``N x VOCAB_CHUNK`` float32 values for N states (32 MB for 1,000 states).
VOCAB_CHUNK = 8192

#: Beside a saved student with a value head: the head's weights (``weight`` ``[1, H]``, ``bias`` ``[1]``).
VALUE_HEAD_FILE = "value_head.safetensors"


def column_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, cols: Tensor) -> Tensor:
    """Logits ``[R, C]`` of the token ids ``cols`` ``[C]`` at every hidden state ``[R, H]``."""
    logits = hidden.to(weight.dtype) @ weight[cols].T
    return logits if bias is None else logits + bias[cols]


def gather_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor) -> Tensor:
    """Logits of the tokens ``ids`` ``[..., M]`` from hidden states ``[..., H]``: ``w[ids] . h + b[ids]``.

    The candidate sets of a batch overlap heavily (the same few thousand tokens recur), so the
    logits are computed once per distinct id: ``h @ w[U].T`` ``[R, U]`` for the U distinct ids, then
    gathered per row. That beats gathering a weight row per (state, candidate) (``[R, M, H]``) in
    both time and memory whenever ``U < M * H``, which is the rule and is checked per call
    (``python -m benchmarks.gather_logits``: 2.7x at V = 49K, 10x at V = 8K, on real annotated batches).
    """
    lead, m = ids.shape[:-1], ids.shape[-1]
    flat_ids = ids.reshape(-1, m)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    unique, inverse = torch.unique(flat_ids, return_inverse=True)
    if unique.numel() < m * weight.shape[1]:
        return column_logits(flat_hidden, weight, bias, unique).gather(-1, inverse).reshape(*lead, m)
    # a very diverse set of ids: one weight row per (state, candidate)
    rows = nn.functional.embedding(flat_ids, weight)  # [R, M, H]
    logits = (rows @ flat_hidden.unsqueeze(-1).to(rows.dtype)).squeeze(-1).reshape(*lead, m)
    return logits if bias is None else logits + bias[ids]


# ---------------------------------------------------------------------- the full-vocabulary normaliser
def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the LM-head product runs in: autocast's when it is on, else the wider input dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int, scale: float) -> Tensor:
    """``scale * (h @ W[start:stop].T + b[start:stop])`` in float32, ``h`` already in the compute dtype."""
    z = (h @ weight[start:stop].to(h.dtype).T).float()
    if bias is not None:
        z = z + bias[start:stop].float()
    return z * scale if scale != 1.0 else z


class _VocabLogSumExp(torch.autograd.Function):
    """``log sum_{a in V} exp(scale * (w_a . h + b_a))`` per row, chunked over the vocabulary.

    Forward keeps only the ``[N]`` result; backward recomputes each chunk's logits, so no ``[N, V]``
    tensor ever exists. d lse / d z_a = scale * softmax(scale * z)_a, hence per chunk
    ``G = grad * scale * exp(scale * z - lse)`` and ``dh = G @ W_c``, ``dW_c = G^T h``, ``db_c = sum G``.
    Products run in the compute dtype (autocast's, e.g. bfloat16); softmax weights and the
    log-sum-exp accumulate in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, chunk):
        compute = _compute_dtype(hidden, weight)
        h = hidden.to(compute)
        out = torch.full(hidden.shape[:1], float("-inf"), dtype=torch.float32, device=hidden.device)
        for start in range(0, weight.shape[0], chunk):
            z = _chunk_logits(h, weight, bias, start, min(start + chunk, weight.shape[0]), scale)
            out = torch.logaddexp(out, z.logsumexp(-1))
        ctx.save_for_backward(hidden, weight, bias, out)
        ctx.scale, ctx.chunk, ctx.compute = scale, chunk, compute
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, out = ctx.saved_tensors
        scale, chunk, compute = ctx.scale, ctx.chunk, ctx.compute
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h = hidden.to(compute)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        row_scale = (grad.float() * scale).unsqueeze(-1)
        for start in range(0, weight.shape[0], chunk):
            stop = min(start + chunk, weight.shape[0])
            g = torch.exp(_chunk_logits(h, weight, bias, start, stop, scale) - out.unsqueeze(-1)) * row_scale
            g_c = g.to(compute)
            if need_h:
                grad_h += (g_c @ weight[start:stop].to(compute)).float()
            if need_w:
                grad_w[start:stop] = (g_c.T @ h).to(weight.dtype)
            if grad_b is not None:
                grad_b[start:stop] = g.sum(0).to(bias.dtype)
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b, None, None


def vocab_logsumexp(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, scale: float = 1.0, chunk: int = VOCAB_CHUNK
) -> Tensor:
    """Exact ``logsumexp_{a in V} scale * (w_a . h + b_a)`` over the whole vocabulary, differentiable,
    in ``chunk``-column pieces: peak memory O(N x chunk) instead of the ``[N, V]`` logits. ``hidden``
    is ``[..., H]``; the result is float32 ``[...]``."""
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _VocabLogSumExp.apply(flat, weight, bias, float(scale), int(chunk)).reshape(lead)


class VocabSummary(NamedTuple):
    """Per-row facts about ``softmax(scale * logits)`` over the whole vocabulary (no gradient)."""

    log_z: Tensor  # logsumexp of the scaled logits
    max: Tensor  # the largest scaled logit
    argmax: Tensor  # its token id
    entropy: Tensor  # entropy of the softmax, nats


@torch.no_grad()
def vocab_summary(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, scale: float = 1.0, chunk: int = VOCAB_CHUNK
) -> VocabSummary:
    """One chunked pass without gradient: log-normaliser, max, argmax and entropy of the full-vocabulary
    softmax. The running sums are rescaled whenever the running max grows (the online-softmax
    recurrence), so the pass keeps O(N x chunk) memory."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h.to(_compute_dtype(h, weight))
    n, device = h.shape[0], h.device
    best = torch.full((n,), float("-inf"), device=device)
    arg = torch.zeros(n, dtype=torch.long, device=device)
    total = torch.zeros(n, device=device)  # sum exp(z - best)
    first = torch.zeros(n, device=device)  # sum exp(z - best) * z
    for start in range(0, weight.shape[0], chunk):
        z = _chunk_logits(h, weight, bias, start, min(start + chunk, weight.shape[0]), scale)
        value, index = z.max(-1)
        grow = value > best
        arg = torch.where(grow, index + start, arg)
        new = torch.maximum(best, value)
        shrink = torch.exp(best - new)
        e = torch.exp(z - new.unsqueeze(-1))
        total = total * shrink + e.sum(-1)
        first = first * shrink + (e * z).sum(-1)
        best = new
    log_z = best + total.log()
    entropy = log_z - first / total
    return VocabSummary(*(x.reshape(lead) for x in (log_z, best, arg, entropy)))


class SupportSummary(NamedTuple):
    """Per-state facts about the decoding policy ``softmax(scale * logits)`` against the teacher's A_p(s)."""

    entropy: Tensor  # full-vocabulary entropy, nats
    outside_mass: Tensor  # 1 - pi(A_p(s) | s)
    mode_outside: Tensor  # bool: argmax pi(. | s) not in A_p(s)


@torch.no_grad()
def support_summary(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cand_ids: Tensor,
    cand_mask: Tensor,
    *,
    scale: float = 1.0,
    chunk: int = VOCAB_CHUNK,
) -> SupportSummary:
    """Entropy, mass outside A_p(s) (the ``cand_ids`` ``[..., K]`` where ``cand_mask``) and whether the mode
    lies outside it, of the full-vocabulary softmax at every hidden state ``[..., H]``: the one computation
    behind ``policy/*`` (training states) and ``eval/*`` (the student's own sampled states). The set's
    logits are computed as the normaliser's chunks are, unclamped."""
    summary = vocab_summary(hidden, weight, bias, scale=scale, chunk=chunk)
    # the set's logits exactly as the normaliser computes its chunks: the product in the compute dtype,
    # the bias added in float32 (a bf16 head would otherwise round the set and log Z differently)
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h.to(_compute_dtype(h, weight))
    ids = cand_ids.reshape(-1, cand_ids.shape[-1])
    unique, inverse = torch.unique(ids, return_inverse=True)
    z = (h @ weight[unique].to(h.dtype).T).float()
    if bias is not None:
        z = z + bias[unique].float()
    logits = z.gather(-1, inverse).reshape(cand_ids.shape) * scale
    log_inside = torch.logsumexp(logits.masked_fill(~cand_mask.bool(), float("-inf")), -1) - summary.log_z
    return SupportSummary(summary.entropy, 1.0 - log_inside.exp(), ~in_set(cand_ids, cand_mask, summary.argmax))


class Student(nn.Module):
    """A causal LM as policy / Q-network.

    Args:
        model: an HF causal LM (``base_model`` trunk + ``get_output_embeddings()`` head).
        tokenizer: its tokenizer (must equal the teacher's vocabulary; see
            :func:`tdrl.data.check_same_vocabulary`).
        value_head: add a scalar head ``V(s) = v . h(s) + c`` (zero-initialised), for agents that need one.

    ``lora`` is the student's :class:`~tdrl.models.lora.Adapter` once :func:`~tdrl.models.lora.apply_lora`
    put LoRA adapters on ``model`` (in place: ``model`` stays the HF model), else None.
    """

    def __init__(self, model, tokenizer=None, *, value_head: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lora = None  # an Adapter (not a module: its weights are model's) after apply_lora
        config = getattr(model, "config", None)
        if getattr(config, "final_logit_softcapping", None):
            raise ConfigError("students with final_logit_softcapping are not supported on the sparse logits path")
        self.value_head = nn.Linear(self.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # -------------------------------------------------------------- shape facts
    @property
    def hidden_size(self) -> int:
        return int(self._shape_weight().shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self._shape_weight().shape[0])

    @property
    def device(self) -> torch.device:
        return self._shape_weight().device

    def _shape_weight(self) -> Tensor:
        """The head's weight for shape and device facts: a LoRA student's base weight (no ``W + BA`` built)."""
        return self.output_weight() if self.lora is None else self.model.get_output_embeddings().weight

    def enable_value_head(self) -> nn.Linear:
        """Create the scalar value head if missing (zero-initialised) and return it."""
        if self.value_head is None:
            self.value_head = nn.Linear(self.hidden_size, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        return self.value_head

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the trunk's layer activations in the backward pass instead of keeping them (training
        mode only; the same loss and gradients, tested): :func:`~tdrl.models.lora.enable_gradient_checkpointing`."""
        enable_gradient_checkpointing(self.model)

    # -------------------------------------------------------------- forward pieces
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states ``[B, T, H]`` of the decoder trunk (no LM head, no ``[B, T, V]``, no KV cache)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def output_weight(self) -> Tensor:
        """The LM head's weight ``[V, H]``; for a LoRA-adapted head its effective ``W + (alpha / r) B A``
        (:func:`~tdrl.models.lora.head_weight`), so the sparse logits and the normaliser are the model's own."""
        return head_weight(self.model.get_output_embeddings())

    def output_bias(self) -> Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    def subset_logits(self, hidden: Tensor, cand_ids: Tensor) -> Tensor:
        """LM-head logits of the candidates only: ``[..., K]`` from ``hidden [..., H]`` and ``cand_ids [..., K]``."""
        return gather_logits(hidden, self.output_weight(), self.output_bias(), cand_ids)

    def full_logits(self, hidden: Tensor) -> Tensor:
        """LM-head logits over the whole vocabulary ``[..., V]`` (decoding, ``restrict="none"``)."""
        return self.model.get_output_embeddings()(hidden)

    def value(self, hidden: Tensor) -> Tensor:
        if self.value_head is None:
            raise ConfigError("this student has no value head: call enable_value_head() first")
        return self.value_head(hidden).squeeze(-1)

    # -------------------------------------------------------------- persistence
    def save_pretrained(
        self, path: str | os.PathLike, *, state_dict: dict[str, Tensor] | None = None, value_head: dict | None = None
    ) -> None:
        """Write the student into ``path``: an ordinary HF model directory (safetensors) anyone can
        ``from_pretrained``, its tokenizer, and a value head, if any, beside it as ``value_head.safetensors``.
        A LoRA student writes what its ``lora.export`` says: the merged model, or peft's adapter files
        (:class:`~tdrl.models.lora.Adapter`).

        ``state_dict``: the HF model's weights to write instead of its own (the keys of
        ``self.model.state_dict()``, no wrapper's prefix; e.g. gathered whole under FSDP, on the main process
        only, so not checked against the live, possibly sharded, model); ``value_head``: the head's, likewise.
        Writes into ``path`` directly; for a directory that appears all at once, call it inside
        :func:`tdrl.integrity.atomic_dir`."""
        from safetensors.torch import save_file

        path = Path(path)
        weights = None if state_dict is None else dict(state_dict)  # transformers empties the dict it writes
        if self.lora is not None:
            self.lora.save(path, self.model, weights)
        else:
            self.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            state = {k: v.detach().contiguous() for k, v in (value_head or self.value_head.state_dict()).items()}
            save_file(state, str(path / VALUE_HEAD_FILE))


def load_student(
    name: str,
    teacher=None,
    *,
    value_head: bool = False,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Student:
    """Resolve a student name: ``tiny`` (the :mod:`tdrl.models.tiny` GPT-2, the tiny teacher's vocabulary),
    ``layers:0,10,20,29`` (a subset of the given teacher's decoder layers), a local directory, or a
    hub id. A directory holding a LoRA adapter export (``adapter_config.json``) is its base (built by the
    tdrl name it records; a ``layers:`` cut needs the teacher) with the adapter merged in."""
    if name == "tiny":
        model, tokenizer = tiny_student_model()
        return Student(model.to(dtype).train(), tokenizer, value_head=value_head)
    if name.startswith("layers:") and not re.fullmatch(r"layers:\s*\d+(\s*,\s*\d+)*\s*", name):
        raise ConfigError(
            f"student {name!r}: a layer cut is 'layers:' and comma-separated teacher layer indices >= 0, e.g. "
            "layers:0,10,20,29"
        )
    match = re.fullmatch(r"layers:([\d,\s]+)", name)
    if match:
        if teacher is None:
            raise ConfigError("a 'layers:...' student is built from the teacher's layers: pass the teacher")
        layers = [int(x) for x in match.group(1).split(",") if x.strip()]
        if len(set(layers)) != len(layers):
            raise ConfigError(f"student {name!r} repeats a teacher layer: each layer of the cut is a distinct one")
        model = from_teacher_layers(teacher, layers, dtype=dtype)
        return Student(model, teacher.tokenizer, value_head=value_head)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, source = resolve_name(name, "student (besides 'tiny' and 'layers:i,j,...')")
    local = Path(source)
    if kind == "local" and (local / ADAPTER_CONFIG).is_file():
        model, tokenizer = load_adapter_model(local, teacher, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        check_model_directory(kind, source, "student")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise ModelNotFoundError(f"could not load student {name!r}: {str(exc).splitlines()[0]}") from exc
    student = Student(model.train(), tokenizer, value_head=value_head)
    if value_head and kind == "local" and (local / VALUE_HEAD_FILE).is_file():
        from safetensors.torch import load_file

        student.value_head.load_state_dict(load_file(str(local / VALUE_HEAD_FILE)))
    return student
