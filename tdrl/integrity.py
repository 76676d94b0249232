"""Nothing lost, nothing silently wrong: checksummed directories, JSON read with the file's name in
its errors, and an advisory lock so two processes never write one directory.

A checkpoint or cache shard is written to a temporary name, given a manifest (every file's size and
sha256), and renamed into place; :func:`verify_manifest` re-hashes it before anything trusts it, so a
truncated or bit-flipped file is named instead of loaded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tdrl.errors import ConfigError, DataError

__all__ = [
    "MANIFEST",
    "LOCK_FILE",
    "file_digest",
    "write_manifest",
    "verify_manifest",
    "read_json",
    "write_json_atomic",
    "write_text_atomic",
    "atomic_file",
    "atomic_dir",
    "DirectoryLock",
]

MANIFEST = "tdrl-manifest.json"
#: The file :class:`DirectoryLock` locks, inside the directory it guards.
LOCK_FILE = ".tdrl.lock"


def file_digest(path: Path, chunk: int = 1 << 22) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _files(root: Path, skip: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip and MANIFEST not in p.name)


def write_manifest(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Record every file under ``root`` (but ``skip``) in ``root/tdrl-manifest.json``; returns it."""
    root = Path(root)
    manifest = {str(p.relative_to(root)): file_digest(p) for p in _files(root, skip)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(root: str | os.PathLike, *, hashes: bool = True) -> list[str]:
    """What is wrong with ``root`` against its manifest: missing, truncated or changed files (empty list:
    intact). ``hashes=False`` checks presence and sizes only (cheap)."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        return [f"{root / MANIFEST} is missing"]
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [f"{root / MANIFEST} is not valid JSON"]
    problems = []
    for name, want in manifest.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {want['size']} were written")
        elif hashes and file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path} has changed since it was written (sha256 mismatch)")
    return problems


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """``json.loads`` of a file, with the file named in the error (:class:`~tdrl.errors.DataError`)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON ({exc})") from None


def write_json_atomic(path: str | os.PathLike, value) -> None:
    """Write ``value`` as JSON over ``path`` all at once (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) over ``path`` all at once (:func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(text)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[TextIO]:
    """Write a text file all at once: yields a UTF-8 handle on a temporary sibling of ``path``
    (``.<name>.tmp-<random>``), and when the block ends without an error renames it over ``path``, so
    ``path`` is at every moment either the old complete file or the new one. On an error the temporary
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already when the rename succeeded


@contextmanager
def atomic_dir(target: str | os.PathLike, *, token: str | None = None, shared: bool = False) -> Iterator[Path]:
    """Write a directory all at once: yields an empty temporary sibling of ``target``
    (``.<name>.tmp-<token>``), and when the block ends without an error renames it to ``target``,
    replacing what was there (the old directory is moved aside first, then deleted, so ``target`` is
    at every moment either the old complete directory or the new one). On an error, in the block or
    in the renames, the temporary directory is removed and ``target`` is left as it was. ``token``
    names the temporary directory (default: random); a temporary directory of that name left by a
    killed writer is cleared first, unless ``shared``: other processes write into it too (a
    checkpoint's ranks, whose token is fresh for every checkpoint)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{token or uuid.uuid4().hex[:8]}")
    if tmp.exists() and not shared:
        shutil.rmtree(tmp)  # a killed writer's leftovers never join the new directory
    tmp.mkdir(exist_ok=shared)  # other processes sharing the token may have made it
    try:
        yield tmp
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, the old ``target`` moved aside first and deleted after (put back
    if the rename fails)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


class DirectoryLock:
    """An advisory, exclusive lock on a directory (``fcntl.flock`` on ``<dir>/.tdrl.lock``), held
    while a process writes there; a second writer gets a clear error instead of racing the first.
    The operating system releases it when the process dies, so a crash never leaves it stale."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.directory, self.what, self._fh = Path(directory), what, None

    def __enter__(self) -> DirectoryLock:
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"the {self.what} {self.directory} is a file: choose a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.directory / LOCK_FILE, "a+")  # noqa: SIM115 (held until __exit__)
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._fh.close()
            self._fh = None
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(
                    f"another tdrl process is writing to the {self.what} {self.directory}: wait for it, or use "
                    "another directory"
                ) from None
            raise
        return self

    def __exit__(self, *exc) -> bool:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        return False
