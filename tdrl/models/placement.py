"""Where a teacher's weights live: one device, or a **device map** that spreads a teacher too big for one
GPU over several (accelerate's big-model loading, ``from_pretrained(device_map=...)``).

A device map is one of the strategies (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``: accelerate
fills the GPUs it sees), one device (``"cuda:1"``, ``"cpu"``), or a mapping of module names to devices
(a GPU index or a device string; ``""`` names the whole model), given on the command line as a JSON object.
:func:`parse_device_map` checks its form, :func:`check_device_map` a mapping against the model's modules,
and :func:`check_in_memory` refuses offloaded weights: tdrl hashes the teacher's weights (the caches are
keyed by them), so every weight must sit on a device, none on ``meta`` (disk or CPU offload).

A teacher spread over devices takes its inputs on the device of its input embeddings
(:attr:`tdrl.models.lm.LM.device`) and gives its logits on the device of its head.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from tdrl.errors import ConfigError

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "parse_device_map",
    "check_devices_present",
    "check_multi_process",
    "check_device_map",
    "check_in_memory",
    "place_model",
    "input_device",
    "check_movable",
    "plain_copy",
]

#: The device maps accelerate works out by itself from the GPUs it sees.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_FORMS = (
    "auto, balanced, balanced_low_0, sequential, a device such as cuda:1, or a JSON object of module names to "
    'devices such as \'{"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}\''
)


def _device(value: Any, where: str) -> str | int:
    """One device of a map: a GPU index (int >= 0) or a torch device string (not disk, meta)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str):
        raise ConfigError(f"teacher device map: {where} must be a GPU index or a device string, got {value!r}")
    if value in ("disk", "meta"):
        raise ConfigError(
            f"teacher device map: {where} is {value!r}, which offloads weights; tdrl hashes the teacher's weights and "
            "needs every one on a device: give the map devices that hold the whole teacher (or a lower --teacher-dtype)"
        )
    try:
        torch.device(value)
    except RuntimeError:
        raise ConfigError(f"teacher device map: {where} is {value!r}, not a device; use {_FORMS}") from None
    return value


def parse_device_map(value: str | dict | None) -> str | dict[str, str | int] | None:
    """A device map in the form ``from_pretrained(device_map=...)`` takes (``None``: no map), from a
    string (a strategy, a device, or a JSON object) or a mapping; ConfigError naming the accepted forms
    for anything else. The devices' presence is checked when the teacher loads, not here."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in DEVICE_MAP_STRATEGIES:
            return text
        if not text:
            raise ConfigError(f"teacher device map is empty: leave it out (no map), or use {_FORMS}")
        if not text.startswith("{"):
            return _device(text, "the device")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"teacher device map {text!r} is not valid JSON ({exc.msg}); use {_FORMS}") from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"teacher device map must be one of {_FORMS}; got {value!r}")
    out: dict[str, str | int] = {}
    for key, device in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"teacher device map: keys are module names, got {key!r}")
        out[key] = _device(device, f"module {key!r}")
    return out


def check_devices_present(device_map: str | dict | None) -> None:
    """Every device a map names exists on this machine (CUDA devices by index); the strategies need a GPU
    only to be useful, and work on the CPU too."""
    if device_map is None or isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    for value in values:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ConfigError(
                    f"teacher device map names {value!r} but this machine has {count} CUDA GPU(s): name devices it has"
                )
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("teacher device map names mps but MPS is not available here: name devices it has")


def check_multi_process(device_map: str | dict | None) -> None:
    """A strategy spreads one teacher over every GPU this process sees: with several processes on one
    machine, each would spread its own copy over the same GPUs."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES and local > 1:
        raise ConfigError(
            f"teacher device map {device_map!r} spreads the teacher over every GPU, and {local} processes on this "
            "machine would each load their own copy onto the same GPUs: run one process with the map, or one per "
            "GPU with --device cuda and no map"
        )


def check_device_map(model, device_map: dict) -> None:
    """A mapping names modules of ``model`` (``""``: all of it) and gives every weight a device."""
    modules = dict(model.named_modules())
    unknown = sorted(k for k in device_map if k not in modules)
    if unknown:
        top = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(
            f"teacher device map names {', '.join(map(repr, unknown))}, which is no module of the teacher (its "
            f"top-level modules: {top}): use module names of model.named_modules()"
        )

    def covered(weight: str) -> bool:
        return any(key in ("", weight) or weight.startswith(key + ".") for key in device_map)

    missing = [n for n, _ in model.named_parameters() if not covered(n)]
    if missing:
        raise ConfigError(
            f"teacher device map gives no device to {len(missing)} weight(s) of the teacher (e.g. {missing[0]!r}): map "
            "every module (a parent module covers its children; '' the whole model)"
        )


def check_in_memory(model, name: str) -> None:
    """Every weight of ``model`` sits on a device (none offloaded to ``meta``)."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ConfigError(
            f"teacher {name!r}: {len(offloaded)} weight(s) (e.g. {offloaded[0]!r}) are offloaded (on the meta device), "
            "but tdrl hashes the teacher's weights and needs every one on a device: give the device map devices that "
            "hold the whole teacher (more GPUs, or a lower --teacher-dtype)"
        )


def place_model(model, device_map: str | dict | None, device: torch.device | str, dtype=None):
    """Put a model built in memory (the ``tiny`` teacher) where ``device_map`` says (``None``: on
    ``device``), the way ``from_pretrained(device_map=...)`` places a loaded one."""
    if device_map is None:
        return model.to(device)
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        from accelerate import infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        device_map = dict(infer_auto_device_map(model, no_split_module_classes=list(no_split), dtype=dtype))
    if isinstance(device_map, dict):
        check_device_map(model, device_map)
        devices = set(device_map.values())
        if len(devices) > 1:
            from accelerate import dispatch_model

            return dispatch_model(model, device_map=device_map)
        (device_map,) = devices
    return model.to(torch.device("cuda", device_map) if isinstance(device_map, int) else device_map)


def input_device(model) -> torch.device:
    """Where ``model`` takes its inputs: the device of its input embeddings (its first module, also when a
    device map spreads it over several devices), else of its first weight."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        weight = getattr(get(), "weight", None) if callable(get) else None
    except NotImplementedError:
        weight = None
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def check_movable(model, name: str) -> None:
    """A model a device map spreads over several devices stays where the map put it."""
    spread = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(spread) > 1:
        raise ConfigError(
            f"{name!r} is spread over {', '.join(sorted(spread))} by a device map: it stays where the map put it "
            "(load it again without a map to have it on one device)"
        )


def plain_copy(model):
    """A deep copy of ``model`` as an ordinary module: a device-mapped model's accelerate hooks and
    ``hf_device_map`` left out, so the copy moves as a whole (a ``layers:`` student of a big teacher)."""
    import copy

    clone = copy.deepcopy(model)
    if hasattr(clone, "hf_device_map") or any(hasattr(m, "_hf_hook") for m in clone.modules()):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(clone, recurse=True)
        clone.__dict__.pop("hf_device_map", None)
    return clone
