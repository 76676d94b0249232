"""Layer cuts: a student made of a subset of the teacher's decoder layers (``--student layers:0,10,20,29``)."""

from __future__ import annotations

import torch
from torch import nn

from tdrl.errors import ConfigError
from tdrl.models.placement import plain_copy

__all__ = ["from_teacher_layers"]


def _decoder_layers(model) -> nn.ModuleList:
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"could not find the {n} decoder layers of {type(model).__name__}")


def from_teacher_layers(teacher, layers: list[int], *, dtype: torch.dtype = torch.float32):
    """DistilBERT-style initialisation: the teacher's embeddings, final norm and head, and the
    decoder layers ``layers`` (in order). Same tokenizer, so the same vocabulary."""
    model = teacher.model
    n = model.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise ConfigError(f"layers must be indices in 0..{n - 1} of the teacher's {n} layers, got {layers}")
    student = plain_copy(model).to(dtype)  # a device-mapped teacher's copy: no hooks, moved as a whole
    old = _decoder_layers(student)
    new = nn.ModuleList([old[i] for i in layers])
    for parent in student.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
    for new_index, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    student.requires_grad_(True)
    return student.train()
