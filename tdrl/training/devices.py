"""Devices: the one a run asks for exists on this machine (:func:`check_device`), and the one this
process computes on under a multi-process launch (:func:`resolve_device`). Re-exported by
:mod:`tdrl.training.config`."""

from __future__ import annotations

from tdrl.errors import ConfigError

__all__ = ["check_device", "resolve_device"]


def check_device(device: str) -> None:
    """A torch device this machine has: ``cuda`` needs a GPU, ``mps`` Apple's backend."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but this machine has no CUDA GPU: use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was asked for but MPS is not available here: use --device cpu")


def resolve_device(device: str) -> str:
    """The device this process computes on (checked first: :func:`check_device`). ``cuda:N`` is made
    the current CUDA device (accelerate places models on the current one); under a multi-process launch
    (``LOCAL_RANK`` set by torchrun or ``accelerate launch``) a bare ``cuda`` is this process's own GPU,
    so N ranks do not all load their teacher onto GPU 0. Anything else is returned as given."""
    import os

    import torch

    check_device(device)
    target = torch.device(device)
    if target.type != "cuda":
        return device
    if target.index is None and int(os.environ.get("LOCAL_RANK", "-1")) >= 0:
        target = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if target.index is not None:
        torch.cuda.set_device(target.index)
    return str(target)
