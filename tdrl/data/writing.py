"""What the data writers share: sharding, the output directory's settings check, progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tdrl.errors import DataError
from tdrl.integrity import LOCK_FILE, read_json, write_json_atomic

__all__ = [
    "shard_ranges",
    "shards_left",
    "open_output",
    "settings_fingerprint",
    "progress_bar",
    "quiet_datasets",
    "dir_bytes",
]


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def shards_left(paths: list[Path], intact: Callable[[Path], bool], stop_after_shards: int | None = None) -> list[int]:
    """The indices of the shards still to write: missing ones, and ones present but not ``intact``
    (removed here, to be written again); only the first ``stop_after_shards`` of them when given."""
    todo = []
    for index, path in enumerate(paths):
        if path.exists():
            if intact(path):
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        todo.append(index)
    return todo if stop_after_shards is None else todo[:stop_after_shards]


def open_output(out: Path, meta_name: str, settings: dict, kind: str, since: tuple[str, ...] = ()) -> dict:
    """Create ``out`` or check that it holds the same job (same settings); return the meta dict.
    ``since``: settings recorded only since a later tdrl; a *complete* directory that lacks them and
    matches on every other setting is the same job (it is never written again), an incomplete one is
    refused (resuming it could mix shards written with different values)."""
    meta_path = out / meta_name
    if meta_path.is_file():
        meta = read_json(meta_path, "output metadata")
        stored = meta.get("settings", {})
        older = {k: v for k, v in settings.items() if not (k in since and k not in stored)}
        if meta.get("complete") and stored == older:
            return meta
        if meta.get("settings") != settings:
            changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
            raise DataError(
                f"{out} already holds {kind} built with different settings ({', '.join(changed)} differ; "
                f"fingerprint {meta.get('fingerprint')} vs {settings_fingerprint(settings)}): use a new --out "
                "directory or delete the old one"
            )
        return meta
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: choose a directory")
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise DataError(f"{out} exists and is not a tdrl directory of {kind}: choose an empty or new --out")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "settings": settings, "fingerprint": settings_fingerprint(settings), "complete": False}
    write_json_atomic(meta_path, meta)
    return meta


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def progress_bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="shard")


@contextlib.contextmanager
def quiet_datasets():
    """Silence ``datasets``' per-save progress bars (tdrl draws its own per shard)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
