"""Typed errors. Each message says what went wrong and what to do about it.

Every error derives from :class:`TdrlError`, so callers (and the CLI, which prints one line and
exits non-zero) can catch them all; each also derives from the matching builtin (``ValueError``,
``FileNotFoundError``, ``ImportError``) so ordinary ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "TdrlError",
    "ConfigError",
    "VocabularyMismatchError",
    "ModelNotFoundError",
    "MissingDependencyError",
    "DataError",
    "CheckpointNotFoundError",
]


class TdrlError(Exception):
    """Base class of every error tdrl raises on purpose."""


class ConfigError(TdrlError, ValueError):
    """A setting is out of range or unknown (e.g. top_p outside (0, 1], an unknown agent name)."""


class VocabularyMismatchError(TdrlError, ValueError):
    """Teacher and student (or a cache and a tokenizer) do not share one vocabulary."""


class ModelNotFoundError(TdrlError, FileNotFoundError):
    """A teacher/student name is neither a known alias, a local directory, nor a reachable hub id."""


class MissingDependencyError(TdrlError, ImportError):
    """An optional package is missing; the message names the pip command that installs it."""


class DataError(TdrlError, ValueError):
    """A data source or cache is empty, malformed, or was built for something else."""


class CheckpointNotFoundError(TdrlError, FileNotFoundError):
    """A checkpoint directory to resume from or evaluate does not exist or is incomplete."""
