"""Offline data: prompt/response sources, teacher responses, the sparse annotation cache, batching.

Offline agents never need the teacher in memory: the teacher annotates the data once
(:func:`annotate`) and training reads the annotation from disk (:class:`DistillDataset`).

Pipeline::

    load_source("bundled", split="train")          # prompts (2,191 bundled, or JSONL/JSON/CSV/HF)
      -> generate_responses(teacher, ..., out)     # N teacher samples per prompt (SeqKD-style data)
      -> annotate(teacher, load_source(out), ...)  # Arrow cache of sparse teacher targets
      -> DistillDataset(cache) + BucketBatchSampler + collate   # the batch of DESIGN.md

Both writers are sharded: each shard is written to a temporary name and renamed into place once
complete, so an interrupted run keeps its finished shards and resumes with the rest.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tdrl.actions import nucleus_mask, validate_top_k, validate_top_p
from tdrl.errors import ConfigError, DataError, VocabularyMismatchError
from tdrl.integrity import DirectoryLock, read_json, verify_manifest, write_manifest
from tdrl.records import ONLINE_FIELDS, TRAINING_FIELDS
from tdrl.teachers import Reward, Teacher, model_fingerprint, resolve_name

__all__ = [
    "PRESETS",
    "SPLITS",
    "load_source",
    "generate_responses",
    "annotate",
    "load_annotations",
    "annotation_statistics",
    "tokenizer_fingerprint",
    "model_fingerprint",
    "records_fingerprint",
    "check_same_vocabulary",
    "DistillDataset",
    "BucketBatchSampler",
    "collate",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
RESPONSES_META = "tdrl-responses.json"
ANNOTATION_META = "tdrl-annotation.json"
BUNDLED_FILE = "bundled_prompts.jsonl"


@dataclass(frozen=True)
class Preset:
    """Column mapping of a known data set (``context`` is joined into the prompt)."""

    hub_id: str
    prompt_column: str
    response_column: str
    context_column: str | None = None


PRESETS = {
    "dolly": Preset("databricks/databricks-dolly-15k", "instruction", "response", "context"),
}


# ---------------------------------------------------------------------------------------------- sources
def _bundled_records(split: str | None) -> list[dict]:
    text = resources.files("tdrl").joinpath("resources", BUNDLED_FILE).read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: a JSON object must hold exactly one list of records")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records")
            return data
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
            for i, row in enumerate(rows):
                if None in row:  # DictReader puts the fields beyond the header under the key None
                    raise DataError(f"{path}: row {i + 2} has more fields than the header ({len(row) - 1} columns)")
            return rows
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not valid {suffix[1:].upper()}: {exc}") from exc
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .tsv")


def _read_responses_dir(path: Path) -> list[dict]:
    meta = read_json(path / RESPONSES_META, "responses metadata")
    if not meta.get("complete"):
        raise DataError(
            f"{path} holds unfinished teacher responses: rerun `tdrl generate-responses` with the same "
            "arguments to finish them"
        )
    records = []
    for shard in sorted((path / "shards").glob("shard-*.jsonl")):
        records += _read_file(shard)
    return records


def _hub_or_disk(source: str, split: str | None) -> list[dict]:
    import datasets

    try:
        if Path(source).is_dir():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split or "train")
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError ...)
        raise DataError(
            f"could not load data source {source!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}): "
            "pass 'bundled', a .jsonl/.json/.csv file, a directory from `tdrl generate-responses` or "
            "`save_to_disk`, or a hub data set reachable from this machine"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if (split or "train") not in ds:
            raise DataError(f"data source {source!r} has splits {list(ds)}; choose one with split=/--split")
        ds = ds[split or "train"]
    return ds.to_list()


def load_source(
    source: str | os.PathLike | Any,
    *,
    split: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    context_column: str | None = None,
    require_response: bool = False,
):
    """Load (prompt, response) records as a ``datasets.Dataset`` with columns ``id``, ``prompt`` and,
    when present, ``response``, ``response_ids``, ``reference``, ``family``.

    ``source`` is ``"bundled"`` (the shipped instruction set; ``split`` in train/validation/test), a
    preset name (``"dolly"``), a ``.jsonl``/``.json``/``.csv`` file, a directory written by
    :func:`generate_responses` or ``Dataset.save_to_disk``, a ``datasets.Dataset``, or a hub id (passed
    to ``datasets.load_dataset`` untouched). Columns are renamed from ``prompt_column`` /
    ``response_column``; a non-empty ``context_column`` value is appended to the prompt after a blank
    line. Raises :class:`~tdrl.errors.DataError` for empty sources and malformed records.
    """
    import datasets

    name = source if isinstance(source, str) else str(source) if isinstance(source, os.PathLike) else None
    if isinstance(source, datasets.Dataset):
        rows, label = source.to_list(), "the given dataset"
    elif name == "bundled":
        if split is not None and split not in SPLITS:
            raise ConfigError(f"the bundled set has splits {', '.join(SPLITS)}; got split={split!r}")
        rows, label = _bundled_records(split), "bundled"
    else:
        label = name
        if name in PRESETS or name in {p.hub_id for p in PRESETS.values()}:
            preset = PRESETS.get(name) or next(p for p in PRESETS.values() if p.hub_id == name)
            prompt_column, response_column = preset.prompt_column, preset.response_column
            context_column = preset.context_column
            name = preset.hub_id
        kind, where = resolve_name(name, "data source (besides 'bundled' and 'dolly')", DataError)
        path = Path(where)
        if kind == "hub":
            rows = _hub_or_disk(where, split)
        elif path.is_file():
            rows = _read_file(path)
        elif (path / RESPONSES_META).is_file():
            rows = _read_responses_dir(path)
        else:
            rows = _hub_or_disk(str(path), split)
    records = _normalise(rows, label, prompt_column, response_column, context_column, require_response)
    return datasets.Dataset.from_list(records)


def _normalise(rows, label, prompt_column, response_column, context_column, require_response) -> list[dict]:
    if len(rows) == 0:
        raise DataError(f"data source {label!r} is empty: it holds no records")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"record {i} of {label!r} is not an object with named fields: {row!r:.80}")
        prompt = row.get(prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"record {i} of {label!r} has no non-empty {prompt_column!r} (fields: {sorted(row)}): "
                "fix the record or set --prompt-column"
            )
        if context_column and isinstance(row.get(context_column), str) and row[context_column].strip():
            prompt = f"{prompt}\n\n{row[context_column].strip()}"
        record = {"id": str(row.get("id", i)), "prompt": prompt}
        response = row.get(response_column)
        if response is not None:
            if not isinstance(response, str):
                raise DataError(f"record {i} of {label!r}: {response_column!r} must be a string, got {response!r:.80}")
            record["response"] = response
        elif require_response:
            raise DataError(
                f"record {i} of {label!r} has no {response_column!r} (fields: {sorted(row)}): annotation needs "
                "responses; generate them with `tdrl generate-responses` or set --response-column"
            )
        for key in ("response_ids", "reference", "family", "terminated"):
            if key in row and row[key] is not None:
                record[key] = row[key]
        out.append(record)
    return out


# ---------------------------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(
        {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}, sort_keys=True
    )
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]


def records_fingerprint(ds) -> str:
    """sha256 over every record's id, prompt, response and response ids (order included)."""
    digest = hashlib.sha256()
    for row in ds:
        digest.update(json.dumps([row.get("id"), row["prompt"], row.get("response"), row.get("response_ids")]).encode())
    return digest.hexdigest()[:16]


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, *, what: str = "teacher and student") -> None:
    """Raise :class:`~tdrl.errors.VocabularyMismatchError` unless both tokenizers map every token to
    the same id (the paper's stated requirement: actions are shared token ids)."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a != b:
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        moved = sum(1 for tok, i in a.items() if tok in b and b[tok] != i)
        raise VocabularyMismatchError(
            f"{what} use different vocabularies ({len(a)} vs {len(b)} tokens; {only_a} and {only_b} tokens "
            f"missing from the other side, {moved} with different ids): tdrl's actions are token ids, so pick a "
            "student from the teacher's family (e.g. --student layers:0,10,20,29)"
        )


# ---------------------------------------------------------------------------------------------- shard writing
def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def write_json_atomic(path: Path, value) -> None:
    """Write ``value`` as JSON to a temporary sibling, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _open_output(out: Path, meta_name: str, settings: dict, kind: str) -> dict:
    """Create ``out`` or check that it holds the same job (same settings); return the meta dict."""
    meta_path = out / meta_name
    if meta_path.is_file():
        meta = read_json(meta_path, "output metadata")
        if meta.get("settings") != settings:
            changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
            raise DataError(
                f"{out} already holds {kind} built with different settings ({', '.join(changed)} differ; "
                f"fingerprint {meta.get('fingerprint')} vs {_fingerprint(settings)}): use a new --out directory "
                "or delete the old one"
            )
        return meta
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: choose a directory")
    if out.exists() and any(p.name != ".tdrl.lock" for p in out.iterdir()):
        raise DataError(f"{out} exists and is not a tdrl {kind} directory: choose an empty or new --out")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "settings": settings, "fingerprint": _fingerprint(settings), "complete": False}
    write_json_atomic(meta_path, meta)
    return meta


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- responses
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
    for name, value in (("num_responses", num_responses), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size), ("shard_size", shard_size)):  # fmt: skip
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
                "the "
                f"teacher's context of {teacher.max_length}: lower --max-new-tokens or drop them"
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
    meta = _open_output(out, RESPONSES_META, settings, "teacher responses")
    num_responses, max_new_tokens, seed = settings["num_responses"], settings["max_new_tokens"], settings["seed"]
    temperature, top_k, top_p, shard_size = (
        settings["temperature"],
        settings["top_k"],
        settings["top_p"],
        settings["shard_size"],
    )
    jobs = [(row, j) for row in source for j in range(num_responses)]
    ranges = _shard_ranges(len(jobs), shard_size)
    written = 0
    for index, (start, stop) in enumerate(_progress(ranges, progress, "generate-responses")):
        shard = out / "shards" / f"shard-{index:05d}.jsonl"
        if shard.is_file():
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            return out
        lines = []
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
                lines.append(json.dumps(record, ensure_ascii=False))
        tmp = shard.with_name(f".{shard.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, shard)
        written += 1
    meta.update(complete=True, records=len(jobs))
    write_json_atomic(out / RESPONSES_META, meta)
    return out


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="shard")


# ---------------------------------------------------------------------------------------------- annotation
def _features(logprob_dtype: str):
    from datasets import Features, List, Value

    return Features(
        {
            "id": Value("string"),
            "prompt": Value("string"),
            "response": Value("string"),
            "prompt_ids": List(Value("int32")),
            "response_ids": List(Value("int32")),
            "cand_ids": List(List(Value("int32"))),
            "cand_logprobs": List(List(Value(logprob_dtype))),
            "cand_mask": List(List(Value("bool"))),
            "action_logprob": List(Value("float32")),
            "action_in_cand": List(Value("bool")),
            "reward": List(Value("float32")),
            "terminated": Value("bool"),
            "length": Value("int32"),
        }
    )


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
    logprob_dtype: str = "float32",
    batch_size: int = 8,
    shard_size: int = 512,
    strict: bool = False,
    stop_after_shards: int | None = None,
    progress: bool = False,
) -> Path:
    """Run the teacher once over every (prompt, response) of ``source`` and write the sparse
    annotation cache: a ``datasets`` Arrow dataset per shard under ``out/shards`` plus
    ``out/tdrl-annotation.json`` (settings, fingerprint, statistics).

    Per record (see :mod:`tdrl.records`): ``prompt_ids``, ``response_ids``, and per response position
    ``cand_ids`` (int32 ``[K]``), ``cand_logprobs`` (``logprob_dtype`` ``[K]``: the teacher's top-K
    log-probs, kept also outside A_p(s) so one cache can be re-cut at a smaller p), ``cand_mask``
    (A_p(s)), ``action_logprob``, ``action_in_cand``, ``reward``; plus ``terminated`` and ``length``.

    Responses are taken as token ids when the source has them (``generate_responses`` output), else
    tokenised and ended with EOS. Prompts longer than ``max_prompt_len`` tokens are skipped and
    counted (``strict=True`` raises instead); responses are cut at ``max_response_len``.
    """
    top_k, top_p = validate_top_k(top_k), validate_top_p(top_p)
    reward = Reward.parse(reward)
    for name, value in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len),
                        ("batch_size", batch_size), ("shard_size", shard_size)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if logprob_dtype not in ("float16", "float32"):
        raise ConfigError(f"logprob_dtype must be float16 or float32, got {logprob_dtype!r}")
    if len(source) == 0:
        raise DataError("the data source is empty: nothing to annotate")
    if "response" not in source.column_names and "response_ids" not in source.column_names:
        raise DataError(
            "the data source has no responses: annotate needs (prompt, response) pairs; generate them with "
            "`tdrl generate-responses` first"
        )
    out = Path(out)
    settings = {
        "teacher": teacher.name,
        "weights": teacher.weights_fingerprint(),
        "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
        "vocab_size": teacher.vocab_size,
        "template": teacher.render_prompt("{prompt}"),
        "source": records_fingerprint(source),
        "top_k": top_k,
        "top_p": top_p,
        "reward": reward.value,
        "gamma": gamma,
        "max_prompt_len": max_prompt_len,
        "max_response_len": max_response_len,
        "logprob_dtype": logprob_dtype,
        "shard_size": shard_size,
    }
    created = not out.exists()
    with DirectoryLock(out, "annotation directory"):
        meta = _open_output(out, ANNOTATION_META, settings, "a teacher annotation")
        try:
            _annotate_shards(teacher, source, out, settings, strict, stop_after_shards, progress, batch_size)
        except DataError:
            if created and not any((out / "shards").glob("shard-*/data-*.arrow")):
                shutil.rmtree(out, ignore_errors=True)  # nothing usable was written: leave no broken cache behind
            raise
        if stop_after_shards is not None and len(list((out / "shards").glob("shard-*"))) < _n_shards(source, settings):
            return out
        shards = {}
        for p in sorted((out / "shards").glob("shard-*")):
            shards[p.name] = read_json(p / "tdrl-shard.json", "shard record")
        meta.update(
            complete=True,
            shards={name: m["records"] for name, m in shards.items()},
            records=sum(m["records"] for m in shards.values()),
            skipped={key: sum(m["skipped"].get(key, 0) for m in shards.values()) for key in SKIP_REASONS},
        )
        if any(meta["skipped"].values()):
            log.warning("annotate: skipped records: %s", meta["skipped"])
        data = load_annotations(out, _meta=meta)
        meta["statistics"] = annotation_statistics(data)
        meta["bytes_per_token"] = _dir_bytes(out / "shards") / max(1, meta["statistics"]["tokens"])
        write_json_atomic(out / ANNOTATION_META, meta)
    return out


#: Why annotate leaves a record out (counted per reason in tdrl-annotation.json).
SKIP_REASONS = ("prompt_too_long", "beyond_context", "empty_response")


def _n_shards(source, settings) -> int:
    return len(_shard_ranges(len(source), settings["shard_size"]))


def _annotate_shards(teacher, source, out: Path, settings: dict, strict, stop_after_shards, progress, batch_size):
    """Write every missing (or damaged) shard: Arrow data, its record counts, and a manifest."""
    import datasets

    features = _features(settings["logprob_dtype"])
    max_prompt_len, max_response_len = settings["max_prompt_len"], settings["max_response_len"]
    context = teacher.max_length
    written = 0
    ranges = _shard_ranges(len(source), settings["shard_size"])
    for index, (start, stop) in enumerate(_progress(ranges, progress, "annotate")):
        shard = out / "shards" / f"shard-{index:05d}"
        if shard.is_dir():
            if not verify_manifest(shard, hashes=False):
                continue
            shutil.rmtree(shard)  # damaged (a file missing or truncated): write it again
        if stop_after_shards is not None and written >= stop_after_shards:
            return
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
            _annotate_batch(teacher, items[b_start : b_start + batch_size], columns, settings["top_k"],
                            settings["top_p"], Reward.parse(settings["reward"]), settings["gamma"])  # fmt: skip
        tmp = shard.with_name(f".{shard.name}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        if items:  # an empty shard is recorded (its counts) but holds no Arrow data
            with _quiet_datasets():
                datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
        (tmp / "tdrl-shard.json").write_text(json.dumps({"skipped": skipped, "records": len(items)}))
        write_manifest(tmp)
        os.replace(tmp, shard)
        written += 1
    counts = [read_json(p / "tdrl-shard.json", "shard record") for p in (out / "shards").glob("shard-*")]
    if counts and sum(c["records"] for c in counts) == 0:
        totals = {key: sum(c["skipped"].get(key, 0) for c in counts) for key in SKIP_REASONS}
        raise DataError(
            f"no record fits: every one was skipped ({totals}; max_prompt_len={max_prompt_len}, max_response_len="
            f"{max_response_len}, teacher context {context}): raise the limits or use shorter prompts"
        )


def _annotate_batch(teacher, items, columns, top_k, top_p, reward, gamma) -> None:
    seqs = [p + r for _, p, r, _ in items]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), teacher.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ann = teacher.annotate(ids, mask, top_k=top_k, top_p=top_p, reward=reward, gamma=gamma)
    for i, (row, prompt_ids, response_ids, terminated) in enumerate(items):
        lo, hi = len(prompt_ids) - 1, len(prompt_ids) - 1 + len(response_ids)  # states that chose a response token
        sub = ann.subset[i, lo:hi]
        tokens = torch.tensor(response_ids)
        columns["id"].append(str(row["id"]))
        columns["prompt"].append(row["prompt"])
        columns["response"].append(row.get("response") or teacher.tokenizer.decode(response_ids))
        columns["prompt_ids"].append(prompt_ids)
        columns["response_ids"].append(response_ids)
        columns["cand_ids"].append(sub.ids.to(torch.int32).tolist())
        columns["cand_logprobs"].append(sub.logprobs.tolist())
        columns["cand_mask"].append(sub.mask.tolist())
        columns["action_logprob"].append(ann.token_logprob[i, lo:hi].tolist())
        columns["action_in_cand"].append(sub.contains(tokens).tolist())
        columns["reward"].append(ann.reward[i, lo:hi].tolist())
        columns["terminated"].append(bool(terminated))
        columns["length"].append(len(prompt_ids) + len(response_ids))


@contextlib.contextmanager
def _quiet_datasets():
    """Silence ``datasets``' per-save progress bars (tdrl draws its own per shard)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_annotations(path: str | os.PathLike, *, _meta: dict | None = None):
    """The annotation cache at ``path`` as one ``datasets.Dataset`` (shards concatenated), after checking
    that every shard the metadata lists is present and intact (sizes and sha256 of its files)."""
    import datasets

    path = Path(path)
    meta_path = path / ANNOTATION_META
    if not meta_path.is_file():
        raise DataError(f"{path} is not a tdrl annotation cache (no {ANNOTATION_META}): build one with `tdrl annotate`")
    meta = _meta or read_json(meta_path, "annotation metadata")
    if not meta.get("complete"):
        raise DataError(
            f"the annotation in {path} is incomplete: rerun `tdrl annotate` with the same arguments to resume"
        )
    listed = meta.get("shards") or {p.name: None for p in sorted((path / "shards").glob("shard-*"))}
    shards = []
    for name, records in listed.items():
        shard = path / "shards" / name
        problems = verify_manifest(shard) if shard.is_dir() else [f"{shard} is missing"]
        if problems:
            raise DataError(
                f"the annotation cache {path} is damaged ({problems[0]}): rerun `tdrl annotate` with the same "
                "arguments to rebuild the damaged shard"
            )
        if records == 0:
            continue
        data = datasets.load_from_disk(str(shard))
        if records is not None and len(data) != records:
            raise DataError(f"{shard} holds {len(data)} records, its metadata says {records}: rerun `tdrl annotate`")
        shards.append(data)
    if not shards:
        raise DataError(f"the annotation in {path} holds no records (all were skipped?)")
    return datasets.concatenate_datasets(shards)


def annotation_statistics(data) -> dict[str, float]:
    """Mean |A_p(s)| and teacher mass in A_p(s) over every response position, and the token count."""
    sizes, masses, in_cand, tokens = 0.0, 0.0, 0.0, 0
    for row in data.with_format("numpy").iter(batch_size=64):
        for mask, logprobs, hits in zip(row["cand_mask"], row["cand_logprobs"], row["action_in_cand"]):
            mask = np.stack(mask) if mask.dtype == object else mask
            logprobs = np.stack(logprobs) if logprobs.dtype == object else logprobs
            sizes += mask.sum()
            masses += np.where(mask, np.exp(logprobs.astype(np.float64)), 0.0).sum()
            in_cand += np.asarray(hits).sum()
            tokens += mask.shape[0]
    return {
        "tokens": tokens,
        "support_size": sizes / max(tokens, 1),
        "support_mass": masses / max(tokens, 1),
        "action_in_cand": in_cand / max(tokens, 1),
    }


# ---------------------------------------------------------------------------------------------- batching
class DistillDataset(torch.utils.data.Dataset):
    """An annotation cache as a map-style dataset of per-record tensors.

    Args:
        path: directory written by :func:`annotate` (or a loaded ``datasets.Dataset`` of that schema).
        tokenizer: if given, must be the tokenizer the cache was built with (else
            :class:`~tdrl.errors.VocabularyMismatchError`).
        top_p: re-cut A_p(s) at this p from the cached top-K log-probs (default: the cache's p).
    """

    def __init__(self, path, *, tokenizer=None, top_p: float | None = None):
        if isinstance(path, (str, os.PathLike)):
            self.data = load_annotations(path)  # raises DataError unless a complete cache
            self.meta = read_json(Path(path) / ANNOTATION_META, "annotation metadata")
        else:
            self.meta, self.data = {}, path
        settings = self.meta.get("settings", {})
        if tokenizer is not None and settings.get("tokenizer") not in (None, tokenizer_fingerprint(tokenizer)):
            raise VocabularyMismatchError(
                f"the annotation cache {path} was built with another tokenizer (fingerprint {settings['tokenizer']}, "
                f"this one {tokenizer_fingerprint(tokenizer)}): re-annotate with this model's teacher"
            )
        self.top_p = top_p
        vocab = settings.get("vocab_size") or (len(tokenizer) if tokenizer is not None else None)
        if vocab is not None:
            _check_token_ids(self.data, vocab, path)
        self.lengths = np.asarray(self.data["length"], dtype=np.int64)
        self._torch = self.data.with_format("torch")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self._torch[int(index)]
        item = {key: row[key] for key in TRAINING_FIELDS}
        item["cand_logprobs"] = item["cand_logprobs"].float()
        if self.top_p is not None:
            item["cand_mask"] = nucleus_mask(item["cand_logprobs"], self.top_p)
        return item


def _check_token_ids(data, vocab_size: int, where) -> None:
    """Every token id of the cache (prompt, response and candidates) lies in ``[0, vocab_size)``: a
    damaged cache must not train (a negative id would silently index from the end)."""
    import pyarrow.compute as pc

    table = data.data.table if hasattr(data.data, "table") else data.data
    for column, depth in (("prompt_ids", 1), ("response_ids", 1), ("cand_ids", 2)):
        values = table.column(column)
        for _ in range(depth):
            values = pc.list_flatten(values)
        if len(values) == 0:
            continue
        low, high = pc.min_max(values).values()
        if low.as_py() < 0 or high.as_py() >= vocab_size:
            raise DataError(
                f"the annotation cache {where} holds {column} outside 0..{vocab_size - 1} (min {low}, max {high}): "
                "it is damaged or made for another vocabulary; rebuild it with `tdrl annotate`"
            )


def collate(records: Sequence[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Stack records into the batch of DESIGN.md ("one batch, one forward pass").

    Sequences are right-padded to T = the longest prompt + response. Position t is the state
    ``input_ids[:, : t + 1]``; per-position fields describe the action ``input_ids[:, t + 1]``:

    * ``input_ids``, ``attention_mask`` ``[B, T]``;
    * ``response_mask`` ``[B, T]`` True where the action at t is a response token;
    * ``cand_ids`` ``[B, T, K]`` (int64), ``cand_logprobs`` ``[B, T, K]`` (float32, ``-inf`` outside
      A_p(s)), ``cand_mask`` ``[B, T, K]``;
    * ``action_logprob``, ``reward`` ``[B, T]`` (0 off the response), ``action_in_cand`` ``[B, T]``;
    * ``done`` ``[B, T]`` True at the last response position (its next state is terminal);
    * ``terminated`` ``[B]`` the response ended with EOS (False: cut at the length limit);
    * ``behaviour_logprob``, ``student_logprob`` ``[B, T]`` only when every record is an online
      episode that carries them (:data:`tdrl.records.ONLINE_FIELDS`).
    """
    if not records:
        raise DataError("cannot collate an empty batch")
    k = records[0]["cand_ids"].shape[-1]
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in records]
    b, t = len(records), max(lengths)
    batch = {
        "input_ids": torch.full((b, t), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.long),
        "response_mask": torch.zeros((b, t), dtype=torch.bool),
        "cand_ids": torch.zeros((b, t, k), dtype=torch.long),
        "cand_logprobs": torch.full((b, t, k), float("-inf")),
        "cand_mask": torch.zeros((b, t, k), dtype=torch.bool),
        "action_logprob": torch.zeros((b, t)),
        "action_in_cand": torch.zeros((b, t), dtype=torch.bool),
        "reward": torch.zeros((b, t)),
        "done": torch.zeros((b, t), dtype=torch.bool),
        "terminated": torch.zeros(b, dtype=torch.bool),
    }
    for i, r in enumerate(records):
        n_prompt, n = len(r["prompt_ids"]), len(r["response_ids"])
        batch["input_ids"][i, :n_prompt] = torch.as_tensor(r["prompt_ids"])
        batch["input_ids"][i, n_prompt : n_prompt + n] = torch.as_tensor(r["response_ids"])
        batch["attention_mask"][i, : n_prompt + n] = 1
        lo, hi = n_prompt - 1, n_prompt - 1 + n
        mask = torch.as_tensor(r["cand_mask"], dtype=torch.bool)
        batch["response_mask"][i, lo:hi] = True
        batch["cand_ids"][i, lo:hi] = torch.as_tensor(r["cand_ids"]).long()
        batch["cand_logprobs"][i, lo:hi] = torch.as_tensor(r["cand_logprobs"]).float().masked_fill(~mask, float("-inf"))
        batch["cand_mask"][i, lo:hi] = mask
        batch["action_logprob"][i, lo:hi] = torch.as_tensor(r["action_logprob"]).float()
        batch["action_in_cand"][i, lo:hi] = torch.as_tensor(r["action_in_cand"], dtype=torch.bool)
        batch["reward"][i, lo:hi] = torch.as_tensor(r["reward"]).float()
        batch["done"][i, hi - 1] = True
        batch["terminated"][i] = bool(r["terminated"])
    for key in ONLINE_FIELDS:
        if all(key in r for r in records):
            batch[key] = torch.zeros((b, t))
            for i, r in enumerate(records):
                lo = len(r["prompt_ids"]) - 1
                batch[key][i, lo : lo + len(r["response_ids"])] = torch.as_tensor(r[key]).float()
    return batch


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length, in a deterministic order given (seed, epoch), resumable.

    Each epoch: shuffle all indices with ``seed + epoch``, cut them into pools of
    ``batch_size * pool_batches``, sort each pool by length, cut pools into batches, and shuffle the
    batch order. ``state_dict()`` records (epoch, batches already yielded), so a resumed run sees
    exactly the batches an uninterrupted run would have.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        pool_batches: int = 50,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if len(lengths) == 0:
            raise DataError("cannot batch an empty dataset")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.pool_batches = batch_size, seed, pool_batches
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in order (a pure function of seed and epoch)."""
        n = len(self.lengths)
        if not self.shuffle:
            order = np.arange(n)
            out = [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            pool = self.batch_size * self.pool_batches
            out = []
            for start in range(0, n, pool):
                chunk = order[start : start + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                out += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
            out = [out[i] for i in rng.permutation(len(out))]
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        return out

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch (all of it unless resumed mid-way); then the next epoch."""
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
