"""The bundled data, built on first use: teacher responses for the bundled training prompts,
annotated, cached under ``$TDRL_CACHE/data`` by the teacher's weights hash and the settings (both
steps fingerprinted and resumable)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tdrl.data.annotate import annotate
from tdrl.data.generate import generate_responses
from tdrl.data.layout import KEEP_TOP_P, SCHEMA
from tdrl.data.sources import load_source
from tdrl.models.hub import tdrl_cache_dir
from tdrl.models.teacher import Teacher

__all__ = ["prepare_bundled_data", "bundled_data_dir", "bundled_keep_top_p", "KEEP_TOP_P"]

#: Prompts per generation batch (64: 2x the throughput of 16 on 2 CPU cores).
BATCH = 64
#: The responses' key names the cache schema of tdrl 0.2 (2): the responses do not depend on the annotation's
#: layout, so the responses sampled then are reused and only the annotation is rebuilt.
_RESPONSES_KEY_SCHEMA = 2


def bundled_data_dir(teacher: Teacher, train_prompts: int, response_tokens: int, top_k: int, top_p: float) -> Path:
    """The directory of the bundled data of these settings: ``responses/`` and one annotation per layout."""
    # the sampled responses depend on how prompts are batched (the seed is per batch): its size is in the key
    key = [teacher.weights_fingerprint(), train_prompts, response_tokens, top_k, top_p, _RESPONSES_KEY_SCHEMA, BATCH]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return tdrl_cache_dir() / "data" / f"bundled-{digest}"


def bundled_keep_top_p(data, agent_config) -> float:
    """The bundled annotation's ``keep_top_p`` for a run: ``--annotation-keep-top-p``, else
    :data:`KEEP_TOP_P` or the agent's re-cut p if larger (a ``bd:top_p=1.0`` run reads a cache that
    keeps the whole top-K); never below the annotation's own p (the cache keeps A_p(s) anyway)."""
    if data.annotation_keep_top_p is not None:
        return max(data.annotation_keep_top_p, data.annotation_top_p)
    return max(KEEP_TOP_P, data.annotation_top_p, agent_config.top_p or 0.0)


def prepare_bundled_data(
    teacher: Teacher,
    *,
    train_prompts: int = 256,
    response_tokens: int = 48,
    top_k: int = 64,
    top_p: float = 0.8,
    keep_top_p: float = KEEP_TOP_P,
    progress: bool = True,
) -> Path:
    """The annotation cache of ``train_prompts`` bundled training prompts (0: all 1,810), one teacher
    response each (``response_tokens`` long, sampled at top-p ``top_p``), annotated with K = ``top_k``
    and p = ``top_p``, keeping candidates to teacher mass ``keep_top_p`` (:mod:`tdrl.data.layout`); built
    on first use, reused afterwards (the responses are shared by every ``keep_top_p``)."""
    root = bundled_data_dir(teacher, train_prompts, response_tokens, top_k, top_p)
    prompts = load_source("bundled", split="train")
    if train_prompts:
        prompts = prompts.select(range(min(train_prompts, len(prompts))))
    responses = generate_responses(
        teacher,
        prompts,
        root / "responses",
        max_new_tokens=response_tokens,
        top_k=top_k,
        top_p=top_p,
        seed=0,
        batch_size=BATCH,
        shard_size=128,
        progress=progress,
    )
    return annotate(
        teacher,
        load_source(responses),
        root / f"annotated-v{SCHEMA}-keep{keep_top_p:g}",
        top_k=top_k,
        top_p=top_p,
        keep_top_p=keep_top_p,
        shard_size=256,
        progress=progress,
    )
