"""The sparse annotation cache: the teacher run ONCE over every (prompt, response), its top-K
log-probs, A_p(s), the data token's log-prob and reward at every response position, in ``datasets``
Arrow shards written atomically with a manifest each (:func:`annotate`). Offline agents then train
without the teacher in memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from tdrl.actions import validate_top_k, validate_top_p
from tdrl.data.dataset import ANNOTATION_META, annotation_statistics, load_annotations
from tdrl.data.layout import KEEP_TOP_P, LOGPROB_DTYPES, SCHEMA, check_keep_top_p, encode_sets
from tdrl.data.layout import features as layout_features
from tdrl.data.ranks import Ranks
from tdrl.data.sources import records_fingerprint
from tdrl.data.writing import (
    dir_bytes,
    open_output,
    progress_bar,
    quiet_datasets,
    settings_fingerprint,
    shard_ranges,
    shards_left,
)
from tdrl.errors import ConfigError, DataError, check_discount
from tdrl.integrity import DirectoryLock, atomic_dir, read_json, verify_manifest, write_json_atomic, write_manifest
from tdrl.models.lm import tokenizer_fingerprint
from tdrl.models.teacher import Reward, Teacher

__all__ = ["annotate", "SKIP_REASONS", "SHARD_RECORD"]

log = logging.getLogger(__name__)


def _tokenise(teacher: Teacher, row: dict, max_response_len: int) -> tuple[list[int], list[int], bool]:
    prompt_ids = teacher.encode_prompt(row["prompt"])
    if row.get("response_ids") is not None:
        ids = row["response_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise DataError(f"record {row['id']!r}: response_ids must be a list of token ids, got {ids!r:.80}")
        bad = [t for t in ids if not 0 <= t < teacher.vocab_size]
        if bad:
            raise DataError(
                f"record {row['id']!r}: response_ids {bad[:5]} lie outside the teacher's vocabulary "
                f"0..{teacher.vocab_size - 1}"
            )
        response_ids = list(ids)
        terminated = bool(response_ids) and response_ids[-1] == teacher.eos_token_id
    else:  # reference text: tokenise and end it with EOS (the response is complete)
        response_ids = teacher.tokenizer(row.get("response", ""), add_special_tokens=False)["input_ids"]
        response_ids = list(response_ids) + [teacher.eos_token_id]
        terminated = True
    if len(response_ids) > max_response_len:
        response_ids, terminated = response_ids[:max_response_len], False
    return prompt_ids, response_ids, terminated


def annotate(
    teacher: Teacher,
    source,
    out: str | os.PathLike,
    *,
    top_k: int = 64,
    top_p: float = 0.8,
    reward: Reward | str = Reward.LOGPROB,
    gamma: float = 0.99,
    max_prompt_len: int = 512,
    max_response_len: int = 256,
    keep_top_p: float | None = None,
    logprob_dtype: str = "float16",
    batch_size: int = 8,
    shard_size: int = 512,
    strict: bool = False,
    stop_after_shards: int | None = None,
    progress: bool = False,
    ranks: Ranks | None = None,
) -> Path:
    """Run the teacher once over every (prompt, response) of ``source`` and write the sparse
    annotation cache: a ``datasets`` Arrow dataset per shard under ``out/shards`` plus
    ``out/tdrl-annotation.json`` (settings, fingerprint, statistics).

    The shards use the compact layout (:mod:`tdrl.data.layout`): per response position the teacher's
    top-K candidates (descending) up to teacher mass ``keep_top_p`` (at least A_p(s), at most K) as
    token ids and ``logprob_dtype`` log-probs, flattened per record, with their count
    (``cand_count``) and the size of A_p(s) at ``top_p`` (``cand_size``: A_p(s) is a prefix); the
    same at the final state (``final_cand_*``: a truncated response bootstraps V(s_T) on A_p(s_T));
    ``action_logprob`` and ``reward`` (float32), ``terminated`` and ``length``. An agent re-cuts
    A_p(s) at any p <= ``keep_top_p`` (``1.0`` keeps the whole top-K, for re-cuts up to p = 1).
    Nothing derived from A_p(s) is stored.

    Responses are taken as token ids when the source has them (``generate_responses`` output), else
    tokenised and ended with EOS. Prompts longer than ``max_prompt_len`` tokens are skipped and
    counted (``strict=True`` raises instead); responses are cut at ``max_response_len``.

    ``ranks`` (:class:`~tdrl.data.ranks.Ranks`, e.g. ``Ranks.from_environment()`` under ``torchrun``):
    each of N processes annotates every N-th shard left to write, rank 0 seals the directory once all
    are done; the cache is the one a single process writes. Every rank must call with the same arguments.
    ``stop_after_shards`` ends early after that many new shards in all (for tests); a rerun resumes.
    """
    top_k, top_p = validate_top_k(top_k), validate_top_p(top_p)
    reward = Reward.parse(reward)
    for name, value in (
        ("max_prompt_len", max_prompt_len),
        ("max_response_len", max_response_len),
        ("batch_size", batch_size),
        ("shard_size", shard_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ConfigError(f"logprob_dtype must be float16 or float32, got {logprob_dtype!r}")
    keep_top_p = check_keep_top_p(max(KEEP_TOP_P, top_p) if keep_top_p is None else keep_top_p, top_p)
    check_discount(gamma, why=" (the inverse_soft_q reward discounts with it)")
    if len(source) == 0:
        raise DataError("the data source is empty: nothing to annotate")
    if "response" not in source.column_names and "response_ids" not in source.column_names:
        raise DataError(
            "the data source has no responses: annotate needs (prompt, response) pairs; generate them with "
            "`tdrl generate-responses` first"
        )
    out = Path(out)
    settings = {
        "schema": SCHEMA,
        "teacher": teacher.name,
        "weights": teacher.weights_fingerprint(),
        "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
        "vocab_size": teacher.vocab_size,
        "template": teacher.render_prompt("{prompt}"),
        "source": records_fingerprint(source),
        "top_k": top_k,
        "top_p": top_p,
        "keep_top_p": keep_top_p,
        "reward": reward.value,
        "gamma": gamma,
        "max_prompt_len": max_prompt_len,
        "max_response_len": max_response_len,
        "logprob_dtype": logprob_dtype,
        "shard_size": shard_size,
    }
    ranks = ranks or Ranks()
    ranks.agree(settings_fingerprint(settings), "the annotation settings, data or teacher weights")
    created = not out.exists()
    n_shards = len(shard_ranges(len(source), shard_size))
    paths = [_shard_path(out, i) for i in range(n_shards)]
    meta: dict = {}

    def start() -> list[int]:  # rank 0, holding the lock: check or create the directory, list what is left
        meta.update(open_output(out, ANNOTATION_META, settings, "teacher annotations"))
        # every file's hash: a rerun after a damaged-shard error rebuilds the shard, as that error advises
        return shards_left(paths, lambda p: not verify_manifest(p), stop_after_shards)

    def finish() -> None:  # rank 0, once every rank is done: seal the directory if no shard is left
        if all(p.is_dir() for p in paths):
            _check_some_record_fits(out, settings, teacher.max_length)
            _seal(out, meta)

    with ranks.holding(DirectoryLock(out, "annotation directory")):
        mine = ranks.mine(ranks.on_main(start))
        try:
            ranks.on_all(lambda: _annotate_shards(teacher, source, out, settings, strict, mine, progress, batch_size))
            ranks.on_main(finish)
        except DataError:  # every rank raises it, once rank 0 has cleaned up (a launcher stops all when one ends)
            ranks.on_main(lambda: _clean_up(out, created))
            raise
    return out


def _clean_up(out: Path, created: bool) -> None:
    if created and not any((out / "shards").glob("shard-*/data-*.arrow")):
        shutil.rmtree(out, ignore_errors=True)  # nothing usable was written: leave no broken cache behind


def _shard_path(out: Path, index: int) -> Path:
    return out / "shards" / f"shard-{index:05d}"


def _seal(out: Path, meta: dict) -> None:
    """Sum the shards' counts into the metadata, mark it complete, add the statistics."""
    shards = {}
    for p in sorted((out / "shards").glob("shard-*")):
        shards[p.name] = read_json(p / SHARD_RECORD, "shard record")
    meta.update(
        complete=True,
        shards={name: m["records"] for name, m in shards.items()},
        records=sum(m["records"] for m in shards.values()),
        skipped={key: sum(m["skipped"].get(key, 0) for m in shards.values()) for key in SKIP_REASONS},
    )
    if any(meta["skipped"].values()):
        log.warning("annotate: skipped records: %s", meta["skipped"])
    data = load_annotations(out, _meta=meta)
    settings = meta["settings"]
    meta["statistics"] = annotation_statistics(data, min(settings["top_k"], settings["vocab_size"]))
    meta["bytes_per_token"] = dir_bytes(out / "shards") / max(1, meta["statistics"]["tokens"])
    write_json_atomic(out / ANNOTATION_META, meta)


#: In every shard directory: its record count and skipped counts (``{"records": n, "skipped": {...}}``).
SHARD_RECORD = "tdrl-shard.json"

#: Why annotate leaves a record out (counted per reason in tdrl-annotation.json).
SKIP_REASONS = ("prompt_too_long", "beyond_context", "empty_response")


def _annotate_shards(teacher, source, out: Path, settings: dict, strict, indices: list[int], progress, batch_size):
    """Write the shards ``indices``: each one's Arrow data, its record counts, and a manifest."""
    import datasets

    features = features_of(settings)
    max_prompt_len, max_response_len = settings["max_prompt_len"], settings["max_response_len"]
    context = teacher.max_length
    ranges = shard_ranges(len(source), settings["shard_size"])
    reward = Reward.parse(settings["reward"])
    for index in progress_bar(indices, progress, "annotate"):
        start, stop = ranges[index]
        columns: dict[str, list] = {name: [] for name in features}
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        items = []
        for i in range(start, stop):
            row = source[i]
            prompt_ids, response_ids, terminated = _tokenise(teacher, row, max_response_len)
            too_long = len(prompt_ids) > max_prompt_len
            beyond = context is not None and len(prompt_ids) + len(response_ids) > context
            if (too_long or beyond) and strict:
                limit = f"max_prompt_len={max_prompt_len}" if too_long else f"the teacher's context of {context} tokens"
                raise DataError(
                    f"record {row['id']!r}: {len(prompt_ids)} prompt + {len(response_ids)} response tokens exceed "
                    f"{limit} (drop --strict to skip such records)"
                )
            reason = "prompt_too_long" if too_long else "beyond_context" if beyond else None
            reason = reason or (None if response_ids else "empty_response")
            if reason:
                skipped[reason] += 1
                continue
            items.append((row, prompt_ids, response_ids, terminated))
        for b_start in range(0, len(items), batch_size):
            batch = items[b_start : b_start + batch_size]
            _annotate_batch(teacher, batch, columns, settings, reward)
        # one writer per shard (rank 0 holds the directory's lock and hands each shard to one rank), so one
        # fixed token is safe and a rerun clears a killed writer's leftovers
        with atomic_dir(_shard_path(out, index), token="writing") as tmp:
            if items:  # an empty shard is recorded (its counts) but holds no Arrow data
                with quiet_datasets():
                    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
            (tmp / SHARD_RECORD).write_text(json.dumps({"skipped": skipped, "records": len(items)}))
            write_manifest(tmp)


def _check_some_record_fits(out: Path, settings: dict, context: int | None) -> None:
    counts = [read_json(p / SHARD_RECORD, "shard record") for p in (out / "shards").glob("shard-*")]
    if counts and sum(c["records"] for c in counts) == 0:
        totals = {key: sum(c["skipped"].get(key, 0) for c in counts) for key in SKIP_REASONS}
        raise DataError(
            f"no record fits: every one was skipped ({totals}; max_prompt_len={settings['max_prompt_len']}, "
            f"max_response_len={settings['max_response_len']}, teacher context {context}): raise the limits or use "
            "shorter prompts"
        )


def features_of(settings: dict):
    """The shards' ``datasets.Features`` (:func:`tdrl.data.layout.features`) for an annotation's settings."""
    return layout_features(
        settings["vocab_size"], min(settings["top_k"], settings["vocab_size"]), settings["logprob_dtype"]
    )


def _annotate_batch(teacher, items, columns, settings: dict, reward) -> None:
    seqs = [p + r for _, p, r, _ in items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), teacher.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ann = teacher.annotate(
        ids, mask, top_k=settings["top_k"], top_p=settings["top_p"], reward=reward, gamma=settings["gamma"]
    )
    keep, dtype = settings["keep_top_p"], settings["logprob_dtype"]
    for i, (row, prompt_ids, response_ids, terminated) in enumerate(items):
        lo = len(prompt_ids) - 1
        hi = lo + len(response_ids)  # positions lo..hi-1 chose a response token; hi is the final state s_T
        sets, final = (
            encode_sets(ann.subset[i, lo:hi], keep, dtype),
            encode_sets(ann.subset[i, hi : hi + 1], keep, dtype),
        )
        record = {
            "id": str(row["id"]),
            "prompt": row["prompt"],
            "response": row.get("response") or teacher.tokenizer.decode(response_ids),
            "prompt_ids": list(prompt_ids),
            "response_ids": list(response_ids),
            "cand_count": sets["count"],
            "cand_size": sets["size"],
            "cand_ids": sets["ids"],
            "cand_logprobs": sets["logprobs"],
            "final_cand_count": int(final["count"][0]),
            "final_cand_size": int(final["size"][0]),
            "final_cand_ids": final["ids"],
            "final_cand_logprobs": final["logprobs"],
            "action_logprob": ann.token_logprob[i, lo:hi].float().cpu().numpy(),
            "reward": ann.reward[i, lo:hi].float().cpu().numpy(),
            "terminated": bool(terminated),
            "length": len(prompt_ids) + len(response_ids),
        }
        for name, column in columns.items():
            column.append(record[name])
