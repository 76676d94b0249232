"""Teacher demonstrations: N sampled responses per prompt, batched and KV-cached, written in
atomic JSONL shards that an interrupted run keeps (:func:`generate_responses`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tdrl.actions import validate_top_k, validate_top_p
from tdrl.data.ranks import Ranks
from tdrl.data.sources import RESPONSES_META, records_fingerprint
from tdrl.data.writing import open_output, progress_bar, settings_fingerprint, shard_ranges, shards_left
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
    ranks: Ranks | None = None,
) -> Path:
    """Write ``num_responses`` teacher samples per prompt of ``source`` (a Dataset from
    :func:`load_source`) to ``out`` as JSONL shards plus ``tdrl-responses.json``.

    Sampling is batched and KV-cached (:meth:`Teacher.generate`), at temperature 1 with top-p 0.8 by
    default so every demonstration token lies in A_p(s). Each shard has its own seed, so the output
    does not depend on where an interrupted run stopped: finished shards are kept and the rest are
    regenerated. ``stop_after_shards`` ends early after writing that many new shards (for tests).

    ``ranks`` (:class:`~tdrl.data.ranks.Ranks`): N processes each write every N-th shard left, rank 0
    seals the directory once all are done; the responses are those of one process (same seeds per batch).
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
        "batch_size": batch_size,  # the sampling seed is per batch: the batches shape the responses
    }
    ranks = ranks or Ranks()
    ranks.agree(settings_fingerprint(settings), "the generation settings, prompts or teacher weights")
    jobs = [(row, j) for row in source for j in range(num_responses)]
    ranges = shard_ranges(len(jobs), shard_size)
    paths = [out / "shards" / f"shard-{index:05d}.jsonl" for index in range(len(ranges))]
    meta: dict = {}

    def start() -> list[int]:  # rank 0, holding the lock: check or create the directory, list what is left
        meta.update(open_output(out, RESPONSES_META, settings, "teacher responses", since=("batch_size",)))
        return shards_left(paths, Path.is_file, stop_after_shards)

    def finish() -> None:  # rank 0, once every rank is done: seal the directory if no shard is left
        if all(p.is_file() for p in paths):
            meta.update(complete=True, records=len(jobs))
            write_json_atomic(out / RESPONSES_META, meta)

    with ranks.holding(DirectoryLock(out, "responses directory")):
        mine = [(paths[i], ranges[i]) for i in ranks.mine(ranks.on_main(start))]
        ranks.on_all(lambda: _generate_shards(teacher, jobs, mine, settings, batch_size, progress))
        ranks.on_main(finish)
    return out


def _generate_shards(teacher, jobs: list, shards: list, settings: dict, batch_size: int, progress) -> None:
    """Write each ``(path, (start, stop))`` of ``shards``: the responses to ``jobs[start:stop]``."""
    max_new_tokens, seed = settings["max_new_tokens"], settings["seed"]
    temperature, top_k, top_p = settings["temperature"], settings["top_k"], settings["top_p"]
    for shard, (start, stop) in progress_bar(shards, progress, "generate-responses"):
        with atomic_file(shard) as fh:  # records go out as they come; the shard appears only once complete
            for b_start in range(start, stop, batch_size):
                batch = jobs[b_start : min(b_start + batch_size, stop)]
                responses = teacher.generate(
                    [row["prompt"] for row, _ in batch],
                    max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=seed * 1_000_003 + b_start,  # the batch's place in the job: any rank draws the same
                )
                for (row, j), ids in zip(batch, responses):
                    fh.write(json.dumps(_record(teacher, row, j, ids), ensure_ascii=False) + "\n")


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
