"""Teacher demonstrations: N sampled responses per prompt, batched and KV-cached, written in
atomic JSONL shards that an interrupted run keeps (:func:`generate_responses`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tdrl.actions import validate_top_k, validate_top_p
from tdrl.data.sources import RESPONSES_META, records_fingerprint
from tdrl.data.writing import open_output, progress_bar, shard_ranges
from tdrl.errors import ConfigError, DataError
from tdrl.integrity import DirectoryLock, atomic_file, write_json_atomic
from tdrl.models.lm import tokenizer_fingerprint
from tdrl.models.teacher import Teacher

__all__ = ["generate_responses"]


def generate_responses(
    teacher: Teacher,
    source,
    out: str | os.PathLike,
    *,
    num_responses: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 64,
    top_p: float = 0.8,
    batch_size: int = 16,
    seed: int = 0,
    shard_size: int = 256,
    stop_after_shards: int | None = None,
    progress: bool = False,
) -> Path:
    """Write ``num_responses`` teacher samples per prompt of ``source`` (a Dataset from
    :func:`load_source`) to ``out`` as JSONL shards plus ``tdrl-responses.json``.

    Sampling is batched and KV-cached (:meth:`Teacher.generate`), at temperature 1 with top-p 0.8 by
    default so every demonstration token lies in A_p(s). Each shard has its own seed, so the output
    does not depend on where an interrupted run stopped: finished shards are kept and the rest are
    regenerated. ``stop_after_shards`` ends early after writing that many new shards (for tests).
    """
    for name, value in (
        ("num_responses", num_responses),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
        ("shard_size", shard_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    validate_top_k(top_k)
    validate_top_p(top_p)
    if len(source) == 0:
        raise DataError("the data source is empty: no prompt to answer")
    if teacher.max_length is not None:
        too_long = [
            r["id"] for r in source if len(teacher.encode_prompt(r["prompt"])) + max_new_tokens > teacher.max_length
        ]
        if too_long:
            raise DataError(
                f"{len(too_long)} prompt(s) (e.g. {too_long[0]!r}) leave no room for {max_new_tokens} new tokens in "
                f"the teacher's context of {teacher.max_length}: lower --max-new-tokens or drop them"
            )
    out = Path(out)
    settings = {
        "teacher": teacher.name,
        "weights": teacher.weights_fingerprint(),
        "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
        "template": teacher.render_prompt("{prompt}"),
        "source": records_fingerprint(source),
        "num_responses": num_responses,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "shard_size": shard_size,
    }
    with DirectoryLock(out, "responses directory"):
        return _generate_shards(teacher, source, out, settings, batch_size, stop_after_shards, progress)


def _generate_shards(teacher, source, out: Path, settings: dict, batch_size: int, stop_after_shards, progress) -> Path:
    meta = open_output(out, RESPONSES_META, settings, "teacher responses")
    num_responses, max_new_tokens, seed = settings["num_responses"], settings["max_new_tokens"], settings["seed"]
    temperature, top_k, top_p = settings["temperature"], settings["top_k"], settings["top_p"]
    jobs = [(row, j) for row in source for j in range(num_responses)]
    ranges = shard_ranges(len(jobs), settings["shard_size"])
    written = 0
    for index, (start, stop) in enumerate(progress_bar(ranges, progress, "generate-responses")):
        shard = out / "shards" / f"shard-{index:05d}.jsonl"
        if shard.is_file():
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            return out
        with atomic_file(shard) as fh:  # records go out as they come; the shard appears only once complete
            for b_start in range(start, stop, batch_size):
                batch = jobs[b_start : min(b_start + batch_size, stop)]
                responses = teacher.generate(
                    [row["prompt"] for row, _ in batch],
                    max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=seed * 1_000_003 + b_start,
                )
                for (row, j), ids in zip(batch, responses):
                    fh.write(json.dumps(_record(teacher, row, j, ids), ensure_ascii=False) + "\n")
        written += 1
    meta.update(complete=True, records=len(jobs))
    write_json_atomic(out / RESPONSES_META, meta)
    return out


def _record(teacher: Teacher, row: dict, j: int, ids: list[int]) -> dict:
    """The ``j``-th response ``ids`` to the prompt ``row`` as a record of the responses file."""
    terminated = bool(ids) and ids[-1] == teacher.eos_token_id
    text_ids = ids[:-1] if terminated else ids
    record = {
        "id": f"{row['id']}#{j}",
        "prompt_id": row["id"],
        "sample": j,
        "prompt": row["prompt"],
        "response": teacher.tokenizer.decode(text_ids, skip_special_tokens=True),
        "response_ids": ids,
        "terminated": terminated,
    }
    for key in ("reference", "family"):
        if row.get(key) is not None:
            record[key] = row[key]
    return record
