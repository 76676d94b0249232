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
    # copy only the chosen layers: the teacher's layer list is swapped for them around the copy (a copy of a
    # big, device-mapped teacher would first need a second teacher's memory where the map put it)
    old = _decoder_layers(model)
    chosen = nn.ModuleList([old[i] for i in layers])
    slots = [
        (qualname, name)
        for qualname, parent in model.named_modules()
        for name, child in parent.named_children()
        if child is old
    ]
    for qualname, name in slots:
        setattr(model.get_submodule(qualname), name, chosen)
    try:
        student = plain_copy(model)  # no hooks: the copy moves as a whole
    finally:
        for qualname, name in slots:
            setattr(model.get_submodule(qualname), name, old)
    student = student.to(dtype)
    new = student.get_submodule(slots[0][0]).get_submodule(slots[0][1])
    for new_index, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    student.requires_grad_(True)
    return student.train()
