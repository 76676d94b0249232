"""FSDP (``--fsdp``): the agent's weights, gradients and AdamW state sharded over the processes with
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), on any device, the CPU with gloo included.

accelerate 1.x turns FSDP on for GPUs and other accelerators only: on the CPU it ignores a
``FullyShardedDataParallelPlugin`` and wraps the model in DDP (checked with accelerate 1.15). So tdrl
shards the agent itself, in :class:`ShardedAccelerator`, an ``Accelerator`` whose ``prepare`` applies
``fully_shard`` (every transformer block, then the whole agent) instead of DDP and re-points the optimiser
at the sharded parameters; everything else (data sharding, accumulation, clipping, RNG states) is
accelerate's. Checkpoints keep the layout of every other run: ``get_state_dict`` and ``save_state``
gather the whole weights (``model.safetensors``) and the whole AdamW state (``optimizer.bin``, keyed by
parameter name, read back with ``torch.load(weights_only=True)``), and ``load_state`` shards them again,
so a resumed run continues bit for bit. Work the main process does alone (validation, the probe, the
test) runs inside :func:`whole_weights`, where every process has gathered the whole weights and no
forward pass needs the others.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import MethodType

import torch
from accelerate import Accelerator

__all__ = ["ShardedAccelerator", "shard", "whole_weights", "is_sharded", "rank_fingerprints"]


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded by :func:`shard` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every transformer block (the classes HF models name in ``_no_split_modules``),
    then the whole module (embeddings, head, the agent's own heads and targets: one group)."""
    from torch.distributed.fsdp import fully_shard

    blocks = set()
    for module in model.modules():
        blocks.update(getattr(module, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


@contextmanager
def whole_weights(model):
    """Every process gathers the whole weights (a collective: every process enters); inside, a forward
    pass on one process alone needs no other (nothing is resharded after it). A no-op unless sharded.
    Inside, ``state_dict()`` would reshard: read weights before or after."""
    if not is_sharded(model):
        with nullcontext():
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.unshard()
    for module in modules[1:]:  # the root is never resharded after its forward
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
        for module in modules[1:]:
            module.set_reshard_after_forward(True, recurse=False)


class _WholeOptimizerState:
    """What accelerate's ``save_state`` / ``load_state`` see of a sharded optimiser: its whole state
    (keyed by parameter name) to save, and a whole state to shard again on load."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state, options=options)


def _load_whole_weights(models: list, input_dir: str) -> None:
    """accelerate's load-state pre-hook: shard each model's whole saved weights into it, then take the
    models off accelerate's list (its own loader cannot load whole tensors into sharded ones)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for i, model in enumerate(models):
        weights = load_file(Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))
        keys = set(weights)
        groups: dict[int, set[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), set()).add(name)
        missing = [n for names in groups.values() if not names & keys for n in names]
        if missing:  # a tied weight is saved once, under one of its names
            raise RuntimeError(f"the checkpoint's weights lack {missing[:5]}")
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
    models.clear()


class ShardedAccelerator(Accelerator):
    """An ``Accelerator`` that shards the prepared model with FSDP2 instead of wrapping it in DDP."""

    def __init__(self, *args, **kwargs):
        from accelerate.utils import DistributedType

        from tdrl.errors import ConfigError

        super().__init__(*args, **kwargs)
        if self.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(
                f"--fsdp shards the agent itself, but accelerate is set up for {self.distributed_type.value}: "
                "launch with a plain multi-process accelerate config (or torchrun), or drop --fsdp"
            )

    def prepare(self, *args, device_placement=None):
        names = {id(p): n for a in args if isinstance(a, torch.nn.Module) for n, p in a.named_parameters()}
        result = super().prepare(*args, device_placement=device_placement)
        params = {n: p for model in self._models for n, p in model.named_parameters()}
        for optimizer in self._optimizers:  # fully_shard replaced the parameters: re-point the optimiser
            for group in optimizer.optimizer.param_groups:
                group["params"] = [params[names[id(p)]] if id(p) in names else p for p in group["params"]]
        return result

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        from accelerate.utils import convert_outputs_to_fp32
        from accelerate.utils.modeling import get_mixed_precision_context_manager

        if device_placement or (device_placement is None and self.device_placement):
            model = model.to(self.device)
        shard(model)
        if self.native_amp:  # as accelerate does: the forward in autocast, its outputs in float32
            autocast = get_mixed_precision_context_manager(self.native_amp, self.autocast_handler)
            model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)
        self._models.append(model)
        if len(self._load_model_state_pre_hook) == 0:
            self.register_load_state_pre_hook(_load_whole_weights)
        return model

    def get_state_dict(self, model, unwrap: bool = True) -> dict:
        """The whole weights on the main process (on the CPU), an empty dict elsewhere; every process calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextmanager
    def _whole_optimizers(self):
        sharded = self._optimizers
        self._optimizers = [_WholeOptimizerState(m, o.optimizer) for m, o in zip(self._models, sharded)]
        try:
            yield
        finally:
            self._optimizers = sharded

    def save_state(self, output_dir=None, **kwargs):
        with self._whole_optimizers():
            return super().save_state(output_dir, **kwargs)

    def load_state(self, input_dir=None, **kwargs):
        with self._whole_optimizers():
            return super().load_state(input_dir, **kwargs)


def rank_fingerprints(accelerator, model) -> list[str] | None:
    """Every process's :func:`~tdrl.models.model_fingerprint` of ``model`` (sharded: of the whole weights
    it gathers), gathered (None for one process). Every process calls it; all must be equal."""
    from types import SimpleNamespace

    from accelerate.utils import gather_object

    from tdrl.models import model_fingerprint

    if accelerator.num_processes == 1:
        return None
    if not is_sharded(model):
        return gather_object([model_fingerprint(model)])
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return gather_object([model_fingerprint(SimpleNamespace(state_dict=lambda: state))])
