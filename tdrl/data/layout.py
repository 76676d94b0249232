"""How the annotation cache stores the teacher's candidates: the **compact** layout (schema 3, the
default since tdrl 0.3) and the **full** layout of earlier caches (schema 2), which still load.

The full layout stored, at every response position, all K = 64 candidates as int32 ids, float32
log-probs and a bool A_p(s) mask: about 560 bytes per response token (benchmarks/RESULTS.md, "The
cache layout"). The compact layout keeps what training reads:

* **A_p(s) as a count.** A_p(s) is a prefix of the candidates (descending probability), so its size
  ``cand_size`` at the annotation's p (computed by the teacher, exact) replaces the K-wide mask.
* **Fewer candidates beyond A_p(s).** Training reads the log-probs inside A_p(s) only (``collate``
  puts ``-inf`` outside it); the candidates beyond it serve re-cuts at a larger p. The cache keeps the
  shortest prefix reaching teacher mass ``keep_top_p`` (default 0.9; ``1.0`` keeps the whole top-K),
  never fewer than A_p(s): ``cand_count`` per position. A re-cut at any p <= ``keep_top_p`` is
  therefore the one a full cache gives (up to the log-probs' rounding); a larger p is refused.
* **Ragged, flattened per record.** ``cand_ids`` / ``cand_logprobs`` concatenate every position's
  kept candidates (one offsets array per record, not one per position).
* **Narrow types.** Token ids as uint16 when the vocabulary has at most 65,536 tokens (int32 above),
  log-probs as float16 by default (``logprob_dtype``: an absolute error below 0.008 nats at
  log-probs above -16, 0.0002 in probability; the reward and ``action_logprob`` stay float32).

:func:`decode` turns either layout's row back into the same per-record tensors (``[n, K]``, ``-inf``
and id 0 beyond the kept candidates, A_p(s) as the mask), so everything after the dataset reads one
format.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tdrl.actions import ActionSubset
from tdrl.errors import ConfigError

__all__ = [
    "SCHEMA",
    "KEEP_TOP_P",
    "LOGPROB_DTYPES",
    "features",
    "encode_sets",
    "keep_counts",
    "is_compact",
    "decode",
    "check_keep_top_p",
    "full_layout",
    "recode",
]

#: The teacher mass a cache keeps candidates to by default (at least the annotation's p): re-cuts up to
#: p = 0.9 from a fifth of the full layout's bytes (benchmarks/RESULTS.md, "The cache layout").
KEEP_TOP_P = 0.9
#: The compact layout (3); 2 is the full layout of tdrl 0.2 (final-state candidates, no in-set flag).
SCHEMA = 3
LOGPROB_DTYPES = ("float16", "float32")


def check_keep_top_p(keep_top_p: float, top_p: float) -> float:
    """``keep_top_p`` lies in [top_p, 1]: the cache keeps at least A_p(s) at its own p."""
    if isinstance(keep_top_p, bool) or not isinstance(keep_top_p, (int, float)) or not top_p <= keep_top_p <= 1.0:
        raise ConfigError(
            f"keep_top_p must lie in [top_p, 1] = [{top_p}, 1] (the candidates kept reach this teacher mass; the "
            f"cache keeps at least A_p(s)), got {keep_top_p!r}"
        )
    return float(keep_top_p)


def id_type(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def count_type(width: int) -> str:
    return "uint8" if width < 1 << 8 else "uint16"


def features(vocab_size: int, width: int, logprob_dtype: str):
    """The compact layout's ``datasets.Features`` for a teacher of ``vocab_size`` tokens and K = ``width``."""
    from datasets import Features, List, Value

    ids, count = id_type(vocab_size), count_type(width)
    return Features(
        {
            "id": Value("string"),
            "prompt": Value("string"),
            "response": Value("string"),
            "prompt_ids": List(Value(ids)),
            "response_ids": List(Value(ids)),
            "cand_count": List(Value(count)),
            "cand_size": List(Value(count)),
            "cand_ids": List(Value(ids)),
            "cand_logprobs": List(Value(logprob_dtype)),
            "final_cand_count": Value(count),
            "final_cand_size": Value(count),
            "final_cand_ids": List(Value(ids)),
            "final_cand_logprobs": List(Value(logprob_dtype)),
            "action_logprob": List(Value("float32")),
            "reward": List(Value("float32")),
            "terminated": Value("bool"),
            "length": Value("int32"),
        }
    )


def keep_counts(logprobs: Tensor, mask: Tensor, keep_top_p: float) -> Tensor:
    """Candidates kept per state (``[...]``): the shortest prefix of ``logprobs`` ``[..., K]`` (descending)
    whose teacher mass reaches ``keep_top_p`` (float64 sums, as :func:`tdrl.actions.nucleus_mask`), at
    least A_p(s) (``mask``), at most K."""
    k = logprobs.shape[-1]
    if keep_top_p >= 1.0:
        return torch.full(logprobs.shape[:-1], k, dtype=torch.long)
    probs = logprobs.double().exp()
    before = probs.cumsum(-1) - probs
    kept = ((before < keep_top_p) & torch.isfinite(logprobs)).sum(-1)
    return torch.maximum(kept, mask.sum(-1)).clamp(max=k)


def encode_sets(subset: ActionSubset, keep_top_p: float, logprob_dtype: str) -> dict:
    """The compact columns of the teacher's sets ``subset`` at ``n`` states (``[n, K]``): per-state
    ``count`` (kept) and ``size`` (|A_p(s)|), and the kept ``ids`` / ``logprobs`` flattened in state order."""
    mask = subset.mask.cpu()
    size = mask.sum(-1)
    if not torch.equal(mask, torch.arange(mask.shape[-1]) < size.unsqueeze(-1)):
        raise ValueError("A_p(s) must be a prefix of the candidates (descending probability)")
    logprobs, ids = subset.logprobs.cpu().float(), subset.ids.cpu()
    count = keep_counts(logprobs, mask, keep_top_p)
    keep = torch.arange(ids.shape[-1]) < count.unsqueeze(-1)
    return {
        "count": count.numpy(),
        "size": size.numpy(),
        "ids": ids[keep].numpy().astype(np.int64),
        "logprobs": logprobs[keep].numpy().astype(logprob_dtype),
    }


def is_compact(column_names) -> bool:
    """Whether a cache's columns are the compact layout's (derived from the data, not from its metadata)."""
    return "cand_count" in column_names


def _as_long(values) -> Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int64).reshape(-1))


def _unflatten(count, size, ids, logprobs, width: int) -> tuple[Tensor, Tensor, Tensor]:
    count, size, ids = _as_long(count), _as_long(size), _as_long(ids)
    logprobs = torch.from_numpy(np.asarray(logprobs, dtype=np.float32).reshape(-1))
    n = count.shape[0]
    if int(count.sum()) != ids.shape[0] or ids.shape[0] != logprobs.shape[0]:
        raise ValueError(f"the candidate counts add up to {int(count.sum())}, the row holds {ids.shape[0]} candidates")
    if bool((count > width).any()) or bool((size > count).any()) or bool((size < 1).any()):
        raise ValueError("a candidate count exceeds K, or A_p(s) is empty or larger than the kept candidates")
    state = torch.repeat_interleave(torch.arange(n), count)
    column = torch.arange(ids.shape[0]) - torch.repeat_interleave(count.cumsum(0) - count, count)
    out_ids = torch.zeros(n, width, dtype=torch.long)
    out_logprobs = torch.full((n, width), float("-inf"))
    out_ids[state, column] = ids
    out_logprobs[state, column] = logprobs
    return out_ids, out_logprobs, torch.arange(width) < size.unsqueeze(-1)


def decode(row: dict, width: int) -> dict[str, Tensor]:
    """The training fields (:data:`tdrl.records.TRAINING_FIELDS`) of one cache row of either layout, as
    tensors: candidates ``[n, K]`` (K = ``width``), ``-inf`` log-probs and id 0 beyond the kept ones,
    A_p(s) as ``cand_mask``. Raises ``ValueError`` on a row whose counts do not match its candidates."""
    out = {
        "prompt_ids": _as_long(row["prompt_ids"]),
        "response_ids": _as_long(row["response_ids"]),
        "action_logprob": torch.from_numpy(np.asarray(row["action_logprob"], dtype=np.float32).reshape(-1)),
        "reward": torch.from_numpy(np.asarray(row["reward"], dtype=np.float32).reshape(-1)),
        "terminated": torch.tensor(bool(row["terminated"])),
    }
    if not is_compact(row):  # the full layout (schema 2): [n, K] columns as stored
        for key in ("cand_ids", "final_cand_ids"):
            out[key] = torch.as_tensor(np.asarray(row[key], dtype=np.int64))
        for key in ("cand_logprobs", "final_cand_logprobs"):
            out[key] = torch.as_tensor(np.asarray(row[key], dtype=np.float32))
        for key in ("cand_mask", "final_cand_mask"):
            out[key] = torch.as_tensor(np.asarray(row[key], dtype=bool))
        if out["cand_ids"].numel() == 0:
            out["cand_ids"] = out["cand_ids"].reshape(0, out["final_cand_ids"].shape[-1])
        return out
    out["cand_ids"], out["cand_logprobs"], out["cand_mask"] = _unflatten(
        row["cand_count"], row["cand_size"], row["cand_ids"], row["cand_logprobs"], width
    )
    final = _unflatten(
        [row["final_cand_count"]], [row["final_cand_size"]], row["final_cand_ids"], row["final_cand_logprobs"], width
    )
    out["final_cand_ids"], out["final_cand_logprobs"], out["final_cand_mask"] = (x[0] for x in final)
    n = out["response_ids"].shape[0]
    if out["cand_ids"].shape[0] != n or out["action_logprob"].shape[0] != n or out["reward"].shape[0] != n:
        raise ValueError(f"the row has {n} response tokens but {out['cand_ids'].shape[0]} candidate sets")
    return out


def full_layout(data, width: int):
    """``data`` (a cache of either layout, a ``datasets.Dataset``) rewritten in the full layout of schema 2:
    K-wide int32 ids, float32 log-probs and a bool mask at every position, the candidates beyond those
    kept as id 0 and ``-inf``. For measuring the layouts against each other and for testing that old
    caches still load; ``tdrl annotate`` writes the compact layout."""
    from datasets import List, Value

    columns = {
        "cand_ids": List(List(Value("int32"))),
        "cand_logprobs": List(List(Value("float32"))),
        "cand_mask": List(List(Value("bool"))),
        "final_cand_ids": List(Value("int32")),
        "final_cand_logprobs": List(Value("float32")),
        "final_cand_mask": List(Value("bool")),
    }
    return _rewrite(data, width, columns, lambda record: {k: record[k].numpy() for k in columns})


def recode(data, width: int, vocab_size: int, keep_top_p: float, logprob_dtype: str):
    """``data`` (either layout) rewritten in the compact layout keeping candidates to mass ``keep_top_p`` as
    ``logprob_dtype``: what ``tdrl annotate`` writes with those settings when ``data`` holds every kept
    candidate at float32 (e.g. a cache annotated with ``keep_top_p=1.0, logprob_dtype="float32"``)."""
    compact = features(vocab_size, width, logprob_dtype)
    columns = {k: v for k, v in compact.items() if k.startswith(("cand_", "final_cand_"))}

    def encode(record):
        sets = encode_sets(
            ActionSubset(record["cand_ids"], record["cand_logprobs"], record["cand_mask"]), keep_top_p, logprob_dtype
        )
        final = encode_sets(
            ActionSubset(
                record["final_cand_ids"][None], record["final_cand_logprobs"][None], record["final_cand_mask"][None]
            ),
            keep_top_p,
            logprob_dtype,
        )
        return {
            **{f"cand_{k}": v for k, v in sets.items()},
            "final_cand_count": int(final["count"][0]),
            "final_cand_size": int(final["size"][0]),
            "final_cand_ids": final["ids"],
            "final_cand_logprobs": final["logprobs"],
        }

    return _rewrite(data, width, columns, encode, ids=compact["prompt_ids"])


def _rewrite(data, width: int, columns: dict, encode, ids=None):
    import datasets
    from datasets import Features, List, Value

    other = {k: v for k, v in data.features.items() if not k.startswith(("cand_", "final_cand_"))}
    other["prompt_ids"] = other["response_ids"] = ids or List(Value("int32"))
    rows = []
    for row, plain in zip(data.with_format("numpy"), data.with_format(None)):
        out = {k: plain[k] for k in other}
        out.update(encode(decode(row, width)))
        rows.append(out)
    return datasets.Dataset.from_list(rows, features=Features({**other, **columns}))
