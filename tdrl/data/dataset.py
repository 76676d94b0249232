"""Reading the annotation cache for training: :func:`load_annotations` (verified shards),
:class:`DistillDataset` (per-record tensors, re-cut to another p), :func:`collate` (the batch of
DESIGN.md: one batch, one forward pass), and the seeded, resumable :class:`BucketBatchSampler`."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tdrl.actions import in_set
from tdrl.data.layout import decode, is_compact
from tdrl.errors import ConfigError, DataError, VocabularyMismatchError
from tdrl.integrity import read_json, verify_manifest
from tdrl.models.lm import tokenizer_fingerprint
from tdrl.records import ONLINE_FIELDS, TRAINING_FIELDS, recut

__all__ = [
    "ANNOTATION_META",
    "load_annotations",
    "annotation_statistics",
    "batch_statistics",
    "DistillDataset",
    "collate",
    "BucketBatchSampler",
    "check_same_vocabulary",
]

ANNOTATION_META = "tdrl-annotation.json"


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


def annotation_statistics(data, width: int | None = None) -> dict[str, float]:
    """Over every response position at the annotation's p: mean |A_p(s)|, teacher mass in A_p(s), the
    fraction of data tokens inside A_p(s) (derived here, as everywhere, by :func:`tdrl.actions.in_set`),
    the mean number of candidates the cache keeps per position (``kept``), and the token count. Reads
    either layout (:mod:`tdrl.data.layout`); ``width``: K (default: the widest kept set)."""
    width = width or cache_width(data)
    sizes, masses, inside, kept, tokens = 0.0, 0.0, 0.0, 0.0, 0
    for row in data.with_format("numpy"):
        record = decode(row, width)
        mask, logprobs = record["cand_mask"], record["cand_logprobs"].double()
        sizes += mask.sum().item()
        masses += torch.where(mask, logprobs.exp(), 0.0).sum().item()
        inside += in_set(record["cand_ids"], mask, record["response_ids"]).sum().item()
        kept += torch.isfinite(logprobs).sum().item()
        tokens += mask.shape[0]
    return {
        "tokens": tokens,
        "support_size": sizes / max(tokens, 1),
        "support_mass": masses / max(tokens, 1),
        "data_in_set": inside / max(tokens, 1),
        "kept": kept / max(tokens, 1),
    }


def cache_width(data, settings: dict | None = None) -> int:
    """K, the candidate slots of a cache's records: ``min(top_k, vocab_size)`` of its settings, else the
    widest set its rows hold."""
    import pyarrow.compute as pc

    settings = settings or {}
    if settings.get("top_k") and settings.get("vocab_size"):
        return min(int(settings["top_k"]), int(settings["vocab_size"]))
    table = data.data.table if hasattr(data.data, "table") else data.data
    if is_compact(data.column_names):
        inner = pc.max(pc.list_flatten(table.column("cand_count"))).as_py() or 1
        return int(max(inner, pc.max(table.column("final_cand_count")).as_py() or 1))
    return len(data[0]["final_cand_ids"]) if len(data) else 1


def batch_statistics(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Over the response positions of a collated batch: mean |A_p(s)| (``support_size``), teacher mass in
    A_p(s) (``support_mass``) and the fraction of data tokens outside A_p(s) (``off_support_frac``,
    derived from the batch's sets by :func:`tdrl.actions.in_set`). The trainer logs them as ``batch/*``."""
    sel = batch["response_mask"].bool()
    mask = batch["cand_mask"][sel]
    mass = torch.where(mask, batch["cand_logprobs"][sel].exp(), torch.zeros_like(mask, dtype=torch.float32))
    actions = torch.zeros_like(batch["input_ids"])
    actions[:, :-1] = batch["input_ids"][:, 1:]
    inside = in_set(batch["cand_ids"][sel], mask, actions[sel])
    return {
        "support_size": mask.sum(-1).float().mean(),
        "support_mass": mass.sum(-1).mean(),
        "off_support_frac": 1.0 - inside.float().mean(),
    }


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


class DistillDataset(torch.utils.data.Dataset):
    """An annotation cache as a map-style dataset of per-record tensors.

    Args:
        path: directory written by :func:`annotate` (or a loaded ``datasets.Dataset`` of that schema).
        tokenizer: if given, must be the tokenizer the cache was built with (else
            :class:`~tdrl.errors.VocabularyMismatchError`).
        top_p: re-cut A_p(s) at this p from the cached top-K log-probs (default: the cache's p); a
            compact cache re-cuts up to its ``keep_top_p`` (:mod:`tdrl.data.layout`).
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
        self.compact = is_compact(self.data.column_names)
        needed = _COMPACT_FIELDS if self.compact else TRAINING_FIELDS
        missing = [c for c in needed if c not in self.data.column_names]
        if missing:
            raise DataError(
                f"the annotation cache {path} lacks {', '.join(missing)} (an older tdrl wrote it without the teacher's "
                "A_p(s) at each response's final state, which a truncated response needs to bootstrap): rebuild it "
                "with `tdrl annotate` into a new directory"
            )
        self.top_p = top_p
        # a compact cache's log-probs reach keep_top_p: a re-cut up to it is exact, a larger p is refused
        # (a compact cache without its metadata: unknown, 0, so recut checks each record's reach itself)
        self.keep_top_p = float(settings.get("keep_top_p", 0.0)) if self.compact else 1.0
        if top_p is not None and top_p > self.keep_top_p and (not self.compact or "keep_top_p" in settings):
            raise ConfigError(
                f"the annotation cache {path} keeps the teacher's candidates up to mass keep_top_p = "
                f"{self.keep_top_p}, so it cannot re-cut A_p(s) at the larger top_p = {top_p}: re-annotate with "
                f"--keep-top-p {top_p} or more (`tdrl annotate`; --annotation-keep-top-p for the bundled data; "
                "1.0 keeps the whole top-K)"
            )
        self.width = cache_width(self.data, settings)
        vocab = settings.get("vocab_size") or (len(tokenizer) if tokenizer is not None else None)
        if vocab is not None:
            _check_token_ids(self.data, vocab, path)
        self.lengths = np.asarray(self.data["length"], dtype=np.int64)
        columns = [c for c in self.data.column_names if c in needed]
        self._rows = self.data.select_columns(columns).with_format("numpy")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Record ``index``'s training fields as tensors (:func:`tdrl.data.layout.decode`: either layout),
        A_p(s) re-cut at ``top_p`` (:func:`~tdrl.records.recut`)."""
        try:
            item = decode(self._rows[int(index)], self.width)
        except ValueError as exc:
            raise DataError(f"record {index} of the annotation cache is damaged ({exc}): rebuild it") from None
        return recut(item, self.top_p, complete_to=self.keep_top_p)


#: The columns :func:`tdrl.data.layout.decode` reads of a compact cache.
_COMPACT_FIELDS = (
    "prompt_ids",
    "response_ids",
    "cand_count",
    "cand_size",
    "cand_ids",
    "cand_logprobs",
    "final_cand_count",
    "final_cand_size",
    "final_cand_ids",
    "final_cand_logprobs",
    "action_logprob",
    "reward",
    "terminated",
)


def _check_token_ids(data, vocab_size: int, where) -> None:
    """Every token id of the cache (prompt, response and candidates) lies in ``[0, vocab_size)``: a
    damaged cache must not train (a negative id would silently index from the end)."""
    import pyarrow.compute as pc

    table = data.data.table if hasattr(data.data, "table") else data.data
    compact = is_compact(data.column_names)
    for column, depth in (("prompt_ids", 1), ("response_ids", 1), ("cand_ids", 1 if compact else 2)):
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


def collate(
    records: Sequence[dict[str, Tensor]], pad_token_id: int, *, top_p: float | None = None
) -> dict[str, Tensor]:
    """Stack records into the batch of DESIGN.md ("one batch, one forward pass"), each record's
    A_p(s) re-cut at ``top_p`` first (:func:`~tdrl.records.recut`; ``None``: as recorded).

    Sequences are right-padded to T = the longest prompt + response. Position t is the state
    ``input_ids[:, : t + 1]``; per-position fields describe the action ``input_ids[:, t + 1]``:

    * ``input_ids``, ``attention_mask`` ``[B, T]``;
    * ``response_mask`` ``[B, T]`` True where the action at t is a response token;
    * ``cand_ids`` ``[B, T, K]`` (int64), ``cand_logprobs`` ``[B, T, K]`` (float32, ``-inf`` outside
      A_p(s)), ``cand_mask`` ``[B, T, K]``: at every response state and at the final state s_T (the
      position after the last response position), whose set a truncated response bootstraps from;
    * ``action_logprob``, ``reward`` ``[B, T]`` (0 off the response);
    * ``last`` ``[B, T]`` True at the last response position; ``terminal`` ``[B, T]`` True there only
      if the response ended with EOS (its next state is terminal: V = 0; a response cut at the length
      limit is not terminal and bootstraps V(s_T));
    * ``terminated`` ``[B]`` the response ended with EOS;
    * ``behaviour_logprob``, ``student_logprob`` ``[B, T]`` only when every record is an online
      episode that carries them (:data:`tdrl.records.ONLINE_FIELDS`).

    Whether the data token lies in A_p(s) is not a batch field: agents derive it from ``cand_ids``,
    ``cand_mask`` and the next token (:func:`tdrl.actions.in_set`).
    """
    if not records:
        raise DataError("cannot collate an empty batch")
    records = [recut(r, top_p) for r in records]
    k = torch.as_tensor(records[0]["cand_ids"]).shape[-1]
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
        "reward": torch.zeros((b, t)),
        "last": torch.zeros((b, t), dtype=torch.bool),
        "terminal": torch.zeros((b, t), dtype=torch.bool),
        "terminated": torch.zeros(b, dtype=torch.bool),
    }
    for i, r in enumerate(records):
        n_prompt, n = len(r["prompt_ids"]), len(r["response_ids"])
        batch["input_ids"][i, :n_prompt] = torch.as_tensor(r["prompt_ids"])
        batch["input_ids"][i, n_prompt : n_prompt + n] = torch.as_tensor(r["response_ids"])
        batch["attention_mask"][i, : n_prompt + n] = 1
        lo, hi = n_prompt - 1, n_prompt - 1 + n
        batch["response_mask"][i, lo:hi] = True
        states = (  # the response states lo..hi-1, then the final state hi
            (slice(lo, hi), r["cand_ids"], r["cand_logprobs"], r["cand_mask"]),
            (hi, r["final_cand_ids"], r["final_cand_logprobs"], r["final_cand_mask"]),
        )
        for where, ids, logprobs, mask in states:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            batch["cand_ids"][i, where] = torch.as_tensor(ids).long()
            batch["cand_logprobs"][i, where] = torch.as_tensor(logprobs).float().masked_fill(~mask, float("-inf"))
            batch["cand_mask"][i, where] = mask
        batch["action_logprob"][i, lo:hi] = torch.as_tensor(r["action_logprob"]).float()
        batch["reward"][i, lo:hi] = torch.as_tensor(r["reward"]).float()
        batch["last"][i, hi - 1] = True
        batch["terminal"][i, hi - 1] = bool(r["terminated"])
        batch["terminated"][i] = bool(r["terminated"])
    for key in ONLINE_FIELDS:
        if all(key in r for r in records):
            batch[key] = torch.zeros((b, t))
            for i, r in enumerate(records):
                lo = len(r["prompt_ids"]) - 1
                batch[key][i, lo : lo + len(r["response_ids"])] = torch.as_tensor(r[key]).float()
    return batch


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length, in a deterministic order given (seed, epoch).

    Each epoch: shuffle all indices with ``seed + epoch``, cut them into pools of
    ``batch_size * pool_batches``, sort each pool by length, cut pools into batches, and shuffle the
    batch order. Iterating yields the batches of :meth:`set_epoch`'s epoch (a pure function of seed and
    epoch), so a resumed run skips the batches it consumed (``accelerate``'s ``skip_first_batches``)
    and sees exactly the batches an uninterrupted run would have.
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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

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
        yield from self.batches(self.epoch)
