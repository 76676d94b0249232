"""Bigger students: LoRA adapters (through ``peft``) and gradient checkpointing.

:func:`apply_lora` puts LoRA adapters on a :class:`~tdrl.models.student.Student`'s HF model in place
(``peft.get_peft_model``): the adapted layers compute ``W x + (alpha / r) B A dropout(x)``, and every
weight of the model but the adapters' is frozen (the value head and an agent's Q heads, which live
outside the HF model, still train). The student keeps its HF model as ``student.model``, so its trunk,
its decoding and every agent run through the adapters unchanged. When the LM head itself is adapted,
:func:`head_weight` is the head's effective weight ``W + (alpha / r) B A``, which the sparse logits and
the chunked full-vocabulary normaliser read: they equal the model's own logits (tested, tied and untied
heads). LoRA dropout on the LM head would need the dropped-out hidden state inside the normaliser's
chunks, so that combination is refused.

What an export holds (``best/``, a checkpoint's ``student/``, a warm start) is the user's choice
(:data:`EXPORTS`):

* ``merged``: a plain HF model, each adapter folded into its weight (:func:`merged_state_dict`, from the
  weights given, so it also works on weights gathered under FSDP); a tied head that was adapted is
  written untied (``tie_word_embeddings`` false), the input embedding keeping the base weights.
* ``adapter``: peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (the adapters only), the
  base named in ``base_model_name_or_path`` by its tdrl student name (``tiny``, ``layers:0,10,20,29``, a
  directory or a hub id). ``peft.PeftModel.from_pretrained(base, directory)`` reloads it on the base, and
  :func:`tdrl.models.load_student` (so ``tdrl eval`` and ``--student``) builds the base and merges it.

peft is optional (``pip install tdrl[lora]``); without it :func:`require_peft` raises
:class:`~tdrl.errors.MissingDependencyError`.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from tdrl.errors import ConfigError, MissingDependencyError, ModelNotFoundError

__all__ = [
    "Adapter",
    "apply_lora",
    "require_peft",
    "head_weight",
    "merged_state_dict",
    "parse_target_modules",
    "load_adapter_model",
    "enable_gradient_checkpointing",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "EXPORTS",
    "ALL_LINEAR",
]

#: peft's files in an adapter directory.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: What an export of a LoRA student holds: the merged model or the adapter.
EXPORTS = ("merged", "adapter")
#: peft's shorthand for every linear (and GPT-2 Conv1D) layer except the output layer.
ALL_LINEAR = "all-linear"
_ADAPTER = "default"  # peft's name of the one adapter


def require_peft():
    """The ``peft`` module, or :class:`~tdrl.errors.MissingDependencyError` naming the install command."""
    try:
        import peft
    except ImportError:
        raise MissingDependencyError(
            "LoRA students (--lora-rank > 0) need the peft package: pip install tdrl[lora] (or pip install peft)"
        ) from None
    return peft


def parse_target_modules(text: str) -> str | list[str]:
    """``--lora-target-modules``: ``all-linear`` or comma-separated module names (peft matches each name
    against the end of a module's dotted path: ``q_proj`` adapts every layer's ``q_proj``)."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ConfigError("--lora-target-modules must name modules (e.g. q_proj,v_proj) or be all-linear")
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise ConfigError(
                f"--lora-target-modules: {ALL_LINEAR} stands alone (every linear layer but the LM head); to add the "
                f"head, list the module names instead, e.g. q_proj,k_proj,v_proj,o_proj,lm_head"
            )
        return ALL_LINEAR
    return names


class Adapter:
    """The LoRA state of a student (not an ``nn.Module``: its weights are the student's own, in
    ``student.model``): the ``peft`` model wrapping ``student.model``, what an export holds, and the
    tdrl name of the base (written into an adapter export)."""

    def __init__(self, peft_model, export: str, base: str):
        self.peft_model, self.export, self.base = peft_model, export, base

    @property
    def config(self):
        return self.peft_model.peft_config[_ADAPTER]

    def save(self, path: Path, model: nn.Module, state_dict: dict[str, Tensor] | None) -> None:
        """Write the adapted ``model`` (weights: ``state_dict``, keys of ``model.state_dict()``, else its
        own) into ``path`` as :attr:`export` says."""
        from safetensors.torch import save_file

        weights = dict(state_dict) if state_dict is not None else model.state_dict()
        if self.export == "merged":
            merged = merged_state_dict(model, weights)
            with _untied(model, untie=_adapted_tied_head(model)):
                model.save_pretrained(path, state_dict=merged, safe_serialization=True)
            return
        from peft.utils import get_peft_model_state_dict

        prefixed = {f"base_model.model.{k}": v for k, v in weights.items()}
        adapter = get_peft_model_state_dict(self.peft_model, state_dict=prefixed, save_embedding_layers=False)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in adapter.items()}
        save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = self.config
        config.base_model_name_or_path = self.base
        config.save_pretrained(str(path))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _is_lora(module: nn.Module) -> bool:
    return getattr(module, "base_layer", None) is not None and hasattr(module, "lora_A")


def _delta(layer: nn.Module, a: Tensor, b: Tensor, adapter: str = _ADAPTER) -> Tensor:
    """``scaling * B A`` of one adapted linear layer, in the layout of its base weight."""
    delta = (b @ a) * layer.scaling[adapter]
    return delta.T if layer.fan_in_fan_out else delta


def head_weight(head: nn.Module) -> Tensor:
    """The effective weight ``[V, H]`` of the output head: its own weight, or, for a LoRA-adapted head,
    ``W + (alpha / r) B A`` (differentiable in A and B), which is what the head's forward applies."""
    if not _is_lora(head):
        return head.weight
    weight = head.base_layer.weight
    if head.disable_adapters or head.merged:
        return weight
    for name in head.active_adapters:
        if name in head.lora_A:
            delta = _delta(head, head.lora_A[name].weight, head.lora_B[name].weight, name)
            weight = weight + delta.to(weight.dtype)
    return weight


def merged_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights of the plain HF model the adapted ``model`` computes: for each LoRA layer ``P`` of
    ``model``, ``P.weight = P.base_layer.weight + scaling B A`` (read from ``state_dict``, whose keys are
    ``model.state_dict()``'s), the adapters' own entries dropped and ``.base_layer.`` removed from the rest."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, layer in _lora_layers(model).items():
        a = state_dict[f"{name}.lora_A.{_ADAPTER}.weight"]
        b = state_dict[f"{name}.lora_B.{_ADAPTER}.weight"]
        base = state_dict[f"{name}.base_layer.weight"]
        out[f"{name}.weight"] = (base.float() + _delta(layer, a.float(), b.float())).to(base.dtype)
    return out


def _adapted_tied_head(model: nn.Module) -> bool:
    """The output head is LoRA-adapted and its base weight is the input embedding's (tied)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return _is_lora(head) and embed is not None and head.base_layer.weight is embed.weight


@contextmanager
def _untied(model: nn.Module, untie: bool):
    """While writing a merged export whose adapted head is no longer the input embedding: a config that
    says so (a reloaded model must not tie them back)."""
    config = model.config
    before = getattr(config, "tie_word_embeddings", None)
    if untie:
        config.tie_word_embeddings = False
    try:
        yield
    finally:
        if untie:
            config.tie_word_embeddings = before


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``--lora-target-modules`` may list)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n})


def apply_lora(
    student,
    *,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str = ALL_LINEAR,
    export: str = "merged",
    base: str | None = None,
):
    """Put rank-``rank`` LoRA adapters on ``student.model`` in place and freeze every other weight of it;
    returns the student. ``target_modules``: see :func:`parse_target_modules`; ``export``: one of
    :data:`EXPORTS`; ``base``: the tdrl name an adapter export records as its base (default: the model's
    ``name_or_path``)."""
    peft = require_peft()
    if rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1 to add adapters, got {rank}")
    if export not in EXPORTS:
        raise ConfigError(f"--lora-export must be one of {', '.join(EXPORTS)}, got {export!r}")
    if getattr(student, "lora", None) is not None:
        raise ConfigError("this student already has LoRA adapters: apply_lora once")
    model = student.model
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=parse_target_modules(target_modules), bias="none"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft transposes them
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # an adapted tied head: see Adapter.save
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            peft_model = peft.get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(
                f"--lora-target-modules {target_modules!r}: {str(exc).splitlines()[0]} (the linear layers of "
                f"{type(model).__name__}: {', '.join(_linear_names(model))}; or use {ALL_LINEAR})"
            ) from None
    from peft.tuners.lora import Linear as LoraLinear

    other = sorted(n for n, m in _lora_layers(model).items() if not isinstance(m, LoraLinear))
    if other:
        raise ConfigError(
            f"--lora-target-modules {target_modules!r} adapts {', '.join(other)}, which are not linear layers: tdrl's "
            "LoRA students adapt linear layers only (list the linear ones, or use all-linear)"
        )
    head = model.get_output_embeddings()
    if _is_lora(head) and dropout > 0:
        raise ConfigError(
            f"--lora-dropout {dropout} with the LM head among the adapted layers: the chunked full-vocabulary "
            "normaliser applies the head's effective weight W + BA, which dropout on its input cannot be folded into; "
            "use --lora-dropout 0 or leave the head out of --lora-target-modules"
        )
    name = base if base is not None else getattr(model, "name_or_path", None)
    student.lora = Adapter(peft_model, export, name)
    return student


def _untie_adapted_head(model: nn.Module) -> None:
    """Give an adapted tied head its own copy of the weight (merging then leaves the input embedding alone)."""
    if _adapted_tied_head(model):
        head = model.get_output_embeddings()
        head.base_layer.weight = nn.Parameter(head.base_layer.weight.detach().clone())
        model.config.tie_word_embeddings = False


def load_adapter_model(path: Path, teacher=None, *, dtype: torch.dtype = torch.float32, trust_remote_code=False):
    """(HF model, tokenizer or None) of an adapter export: its base built by its tdrl name
    (``base_model_name_or_path``; a ``layers:`` cut needs its ``teacher``), the adapter loaded on it
    with peft and merged into its weights."""
    peft = require_peft()
    from tdrl.models.student import load_student

    config = json.loads((path / ADAPTER_CONFIG).read_text())
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise ModelNotFoundError(
            f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path): load its base yourself and "
            f"apply it with peft.PeftModel.from_pretrained(base, {str(path)!r})"
        )
    if Path(base_name).resolve() == path.resolve():
        raise ModelNotFoundError(f"{path} names itself as its base model: fix base_model_name_or_path")
    base = load_student(base_name, teacher, dtype=dtype, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        adapted = peft.PeftModel.from_pretrained(base.model, str(path))
    _untie_adapted_head(adapted.base_model.model)
    model = adapted.merge_and_unload().requires_grad_(True)  # peft froze the base: a student trains
    tokenizer = base.tokenizer
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (HF's non-reentrant checkpointing,
    which needs no input that requires grad: LoRA students included); only in training mode."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing: drop --gradient-checkpointing"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
