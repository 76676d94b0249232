"""Prompt and response sources: the bundled instruction set, files (JSONL / JSON / CSV / TSV),
``save_to_disk`` directories, ``generate-responses`` output, presets (``dolly``) and hub data sets.
Names resolve locally first (:func:`tdrl.models.resolve_name`)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tdrl.errors import ConfigError, DataError
from tdrl.integrity import read_json
from tdrl.models.hub import resolve_name

__all__ = ["PRESETS", "SPLITS", "Preset", "load_source", "parse_split", "records_fingerprint", "RESPONSES_META"]

#: The bundled splits. train / validation / test come from templates (scripts/make_bundled_prompts.py),
#: grouped so that no template group or near-duplicate crosses them; ``heldout`` is written by hand and
#: follows none of those templates (its ``reference`` is a short human answer, where one exists): the
#: default test set of ``tdrl demo`` and the reproduction.
SPLITS = ("train", "validation", "test", "heldout")

RESPONSES_META = "tdrl-responses.json"

BUNDLED_FILE = "bundled_prompts.jsonl"
HELDOUT_FILE = "heldout_prompts.jsonl"


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


_SLICE = re.compile(r"^(?P<name>[A-Za-z_]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def parse_split(split: str) -> tuple[str, slice | None]:
    """``"heldout[-64:]"`` -> ``("heldout", slice(-64, None))``; a plain name has no slice. The bundled
    set's splits take the ``datasets`` slicing syntax with record counts (no percentages)."""
    match = _SLICE.match(split)
    if match is None:
        return split, None
    start, stop = (int(match[k]) if match[k] else None for k in ("start", "stop"))
    return match["name"], slice(start, stop)


def _bundled_records(split: str | None) -> list[dict]:
    records = []
    names = (HELDOUT_FILE,) if split == "heldout" else (BUNDLED_FILE,)  # heldout only when asked for
    for name in names:
        text = resources.files("tdrl").joinpath("resources", name).read_text(encoding="utf-8")
        records += [json.loads(line) for line in text.splitlines() if line.strip()]
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
            with path.open(encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: a BOM is not part of a name
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                header = reader.fieldnames or []
                twice = sorted({name for name in header if header.count(name) > 1})
                if twice:
                    raise DataError(f"{path}: column(s) {', '.join(twice)} appear twice in the header: rename one")
                rows = list(reader)
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

    ``source`` is ``"bundled"`` (the shipped instruction set; ``split`` in :data:`SPLITS`; None: the
    three template splits, never ``heldout``, so no held-out prompt reaches training data by default), a
    preset name (``"dolly"``), a ``.jsonl``/``.json``/``.csv`` file, a directory written by
    :func:`generate_responses` or ``Dataset.save_to_disk``, a ``datasets.Dataset``, or a hub id (passed
    to ``datasets.load_dataset`` untouched). Columns are renamed from ``prompt_column`` /
    ``response_column``; a non-empty ``context_column`` value is appended to the prompt after a blank
    line. Raises :class:`~tdrl.errors.DataError` for empty sources and malformed records.
    """
    import datasets

    name = source if isinstance(source, str) else str(source) if isinstance(source, os.PathLike) else None
    if name is None and not isinstance(source, datasets.Dataset):
        raise DataError(
            f"a data source is 'bundled', 'dolly', a path, a hub data set id or a datasets.Dataset, got "
            f"{type(source).__name__} {source!r}"
        )
    if isinstance(source, datasets.Dataset):
        rows, label = source.to_list(), "the given dataset"
    elif name == "bundled":
        part, window = parse_split(split) if split is not None else (None, None)
        if split is not None and part not in SPLITS:
            raise ConfigError(
                f"the bundled set has splits {', '.join(SPLITS)} (or a slice of one, 'heldout[-64:]'); "
                f"got split={split!r}"
            )
        rows, label = _bundled_records(part), "bundled"
        if window is not None:
            held = len(rows)
            rows = rows[window]
            if not rows:
                raise DataError(
                    f"split {split!r} of the bundled set selects no records (the {part!r} split holds {held}): "
                    "widen the slice"
                )
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
    # from_list takes its columns from the first record: a key only some records have (a reference on
    # half of them) is kept for all, None where absent
    keys = list(dict.fromkeys(k for r in records for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in records])


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


def records_fingerprint(ds) -> str:
    """sha256 over every record's id, prompt, response and response ids (order included)."""
    digest = hashlib.sha256()
    for row in ds:
        digest.update(json.dumps([row.get("id"), row["prompt"], row.get("response"), row.get("response_ids")]).encode())
    return digest.hexdigest()[:16]
