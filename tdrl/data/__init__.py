"""Offline data: sources, teacher responses, the sparse annotation cache, batching.

Offline agents never need the teacher in memory: the teacher annotates the data once
(:func:`annotate`) and training reads the annotation from disk (:class:`DistillDataset`)::

    load_source("bundled", split="train")          # prompts (1,810 bundled training prompts, or JSONL/JSON/CSV/HF)
      -> generate_responses(teacher, ..., out)     # N teacher samples per prompt (SeqKD-style data)
      -> annotate(teacher, load_source(out), ...)  # Arrow cache of sparse teacher targets
      -> DistillDataset(cache) + BucketBatchSampler + collate   # the batch of DESIGN.md

Both writers are sharded: each shard is written under a temporary name and renamed into place once
complete (:func:`tdrl.integrity.atomic_dir` for an annotation shard, sealed with a manifest;
:func:`tdrl.integrity.atomic_file` for a responses shard), so an interrupted run keeps its finished
shards and resumes. Under ``accelerate launch`` / ``torchrun`` both writers split the shards over the
processes (:class:`Ranks`, :mod:`tdrl.data.ranks`) and write the cache one process writes.
"""

from tdrl.data.annotate import SKIP_REASONS, annotate
from tdrl.data.bundled import prepare_bundled_data
from tdrl.data.dataset import (
    ANNOTATION_META,
    BucketBatchSampler,
    DistillDataset,
    annotation_statistics,
    batch_statistics,
    check_same_vocabulary,
    collate,
    load_annotations,
)
from tdrl.data.generate import generate_responses
from tdrl.data.ranks import Ranks
from tdrl.data.sources import PRESETS, RESPONSES_META, SPLITS, load_source, records_fingerprint

__all__ = [
    "PRESETS",
    "SPLITS",
    "RESPONSES_META",
    "ANNOTATION_META",
    "SKIP_REASONS",
    "load_source",
    "records_fingerprint",
    "generate_responses",
    "Ranks",
    "annotate",
    "load_annotations",
    "annotation_statistics",
    "batch_statistics",
    "check_same_vocabulary",
    "DistillDataset",
    "BucketBatchSampler",
    "collate",
    "prepare_bundled_data",
]
