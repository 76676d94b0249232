"""The bundled data, built on first use: teacher responses for the bundled training prompts,
annotated, cached under ``$TDRL_CACHE/data`` by the teacher's weights hash and the settings (both
steps fingerprinted and resumable)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tdrl.data.annotate import SCHEMA, annotate
from tdrl.data.generate import generate_responses
from tdrl.data.sources import load_source
from tdrl.models.hub import tdrl_cache_dir
from tdrl.models.teacher import Teacher

__all__ = ["prepare_bundled_data", "bundled_data_dir"]

#: Prompts per generation batch (64: 2x the throughput of 16 on 2 CPU cores).
BATCH = 64


def bundled_data_dir(teacher: Teacher, train_prompts: int, response_tokens: int, top_k: int, top_p: float) -> Path:
    # the sampled responses depend on how prompts are batched (the seed is per batch): its size is in the key
    key = json.dumps([teacher.weights_fingerprint(), train_prompts, response_tokens, top_k, top_p, SCHEMA, BATCH])
    return tdrl_cache_dir() / "data" / f"bundled-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_bundled_data(
    teacher: Teacher,
    *,
    train_prompts: int = 256,
    response_tokens: int = 48,
    top_k: int = 64,
    top_p: float = 0.8,
    progress: bool = True,
) -> Path:
    """The annotation cache of ``train_prompts`` bundled training prompts (0: all 1,810), one teacher
    response each (``response_tokens`` long, sampled at top-p ``top_p``), annotated with K = ``top_k``
    and p = ``top_p``; built on first use, reused afterwards."""
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
        teacher, load_source(responses), root / "annotated", top_k=top_k, top_p=top_p, shard_size=256, progress=progress
    )
