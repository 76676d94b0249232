"""The episode record: one (prompt, response) pair with the teacher's view of every response step.

Offline annotation and online rollouts in the environment produce the same record, so the same
agents train on either. Response position i is the state ``prompt + response[:i]`` and its action is
``response[i]``:

=======================  ==========================  ===============================================
field                    type                        meaning
=======================  ==========================  ===============================================
``prompt``               str                         instruction text ("" when given as token ids)
``response``             str                         decoded response
``prompt_ids``           list[int]                   prompt tokens as the models see them
``response_ids``         list[int] (n)               the actions
``cand_ids``             list[list[int]] (n x K)     the teacher's top-K at each state, descending
``cand_logprobs``        list[list[float]] (n x K)   their teacher log-probs (full-vocabulary
                                                     normalised); the annotation cache keeps them
                                                     beyond A_p(s) (so it re-cuts at any p), env
                                                     episodes carry ``-inf`` outside A_p(s)
``cand_mask``            list[list[bool]] (n x K)    membership of A_p(s) at the record's p
``final_cand_ids``       list[int] (K)               the same three at the state after the last
``final_cand_logprobs``  list[float] (K)             response token, s_T: a response cut at the
``final_cand_mask``      list[bool] (K)              length limit bootstraps V(s_T) on A_p(s_T)
``action_logprob``       list[float] (n)             ``log pi_T(response[i] | state i)``
``reward``               list[float] (n)             the configured teacher reward of each step
``terminated``           bool                        the response ended with EOS (not cut at the limit)
=======================  ==========================  ===============================================

Nothing derived from A_p(s) is stored: whether the data token lies in A_p(s) depends on the p the
record is cut at, so it is computed where the set is used (:func:`tdrl.actions.in_set`), after
:func:`recut`.

Online episodes (the student's own samples) also carry, per response position, the log-probs they
were sampled under: ``behaviour_logprob`` (the behaviour policy, e.g. a student/teacher mixture) and
``student_logprob`` (the student at collection time), so an agent can reuse them with importance
ratios after the student moved (:data:`ONLINE_FIELDS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tdrl.actions import ActionSubset, nucleus_mask

__all__ = [
    "RESPONSE_FIELDS",
    "FINAL_FIELDS",
    "TRAINING_FIELDS",
    "ONLINE_FIELDS",
    "episode_record",
    "annotated_record",
    "record_tensors",
    "recut",
]

#: Per-response-position fields (each a list of length n = len(response_ids)).
RESPONSE_FIELDS = ("cand_ids", "cand_logprobs", "cand_mask", "action_logprob", "reward")
#: The teacher's candidates at the final state s_T (after the last response token).
FINAL_FIELDS = ("final_cand_ids", "final_cand_logprobs", "final_cand_mask")
#: What :func:`tdrl.data.collate` needs of a record.
TRAINING_FIELDS = ("prompt_ids", "response_ids", *RESPONSE_FIELDS, *FINAL_FIELDS, "terminated")
#: Optional per-position fields of online episodes: the log-probs each token was sampled under.
ONLINE_FIELDS = ("behaviour_logprob", "student_logprob")


def record_tensors(record: dict) -> dict[str, Tensor]:
    """The :data:`TRAINING_FIELDS` of a record (lists or tensors), and its :data:`ONLINE_FIELDS` if
    it has them, as tensors, ready for ``collate``."""
    keys = TRAINING_FIELDS + tuple(k for k in ONLINE_FIELDS if k in record)
    return {key: torch.as_tensor(record[key]) for key in keys}


def recut(record: dict, top_p: float | None, *, complete_to: float = 0.0) -> dict:
    """``record`` with A_p(s) re-cut at ``top_p`` from its candidates' log-probs, at every response
    state and at the final state (``None``: unchanged). The one re-cut, for cached and online records
    alike. A set can grow only as far as the record's log-probs reach: the annotation cache keeps the
    whole top-K (or, compact, its candidates up to mass ``keep_top_p``: ``complete_to``, up to which
    no reach check is made, the caller having checked the p), an env episode only its own A_p(s)
    (collect those at the p they train at)."""
    if top_p is None:
        return record
    out = dict(record)
    for logprobs, mask in (("cand_logprobs", "cand_mask"), ("final_cand_logprobs", "final_cand_mask")):
        values = torch.as_tensor(record[logprobs]).float()
        known = torch.isfinite(values)
        short = values.double().exp().sum(-1) < top_p  # the set would have to grow past the known log-probs
        if top_p > complete_to and bool((short & ~known.all(-1)).any()):
            raise ValueError(
                f"this record's teacher log-probs stop at its own A_p(s) (an env episode cut at a smaller p): it "
                f"cannot be re-cut at the larger p = {top_p}; collect episodes at the p they train at"
            )
        out[mask] = nucleus_mask(values, top_p)
    return out


def episode_record(
    *,
    prompt: str,
    response: str,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    subset: ActionSubset,
    final: ActionSubset,
    action_logprob: Tensor,
    reward: Tensor,
    terminated: bool,
) -> dict:
    """Build a record from the teacher's subsets ``[n, K]`` at the response states, its subset ``[K]``
    at the final state, and per-step tensors ``[n]``."""
    tokens = [int(t) for t in response_ids]
    n = len(tokens)
    if subset.ids.shape[0] != n or action_logprob.shape[0] != n or reward.shape[0] != n:
        raise ValueError(f"record needs one teacher step per response token ({n}), got {subset.ids.shape[0]}")
    if final.ids.shape != subset.ids.shape[1:]:
        raise ValueError(
            f"the final state's subset must have shape {tuple(subset.ids.shape[1:])}, got {tuple(final.ids.shape)}"
        )
    return {
        "prompt": prompt,
        "response": response,
        "prompt_ids": [int(t) for t in prompt_ids],
        "response_ids": tokens,
        "cand_ids": subset.ids.tolist(),
        "cand_logprobs": subset.masked_logprobs().tolist(),
        "cand_mask": subset.mask.tolist(),
        "final_cand_ids": final.ids.tolist(),
        "final_cand_logprobs": final.masked_logprobs().tolist(),
        "final_cand_mask": final.mask.tolist(),
        "action_logprob": action_logprob.float().tolist(),
        "reward": reward.float().tolist(),
        "terminated": bool(terminated),
    }


def annotated_record(
    annotation, row: int, prompt_ids: Sequence[int], response_ids: Sequence[int], terminated: bool
) -> dict:
    """The training fields of one (prompt, response) from the teacher's :class:`~tdrl.models.teacher.Annotation`
    of the sequence ``prompt_ids + response_ids`` at batch row ``row``: the top-K log-probs are kept
    beyond A_p(s) (the cache re-cuts at any p), and the final state's candidates come from the
    position of the last response token."""
    lo = len(prompt_ids) - 1
    hi = lo + len(response_ids)  # positions lo..hi-1 chose a response token; hi is the final state s_T
    sub, final = annotation.subset[row, lo:hi], annotation.subset[row, hi]
    return {
        "prompt_ids": [int(t) for t in prompt_ids],
        "response_ids": [int(t) for t in response_ids],
        "cand_ids": sub.ids.tolist(),
        "cand_logprobs": sub.logprobs.float().tolist(),
        "cand_mask": sub.mask.tolist(),
        "final_cand_ids": final.ids.tolist(),
        "final_cand_logprobs": final.logprobs.float().tolist(),
        "final_cand_mask": final.mask.tolist(),
        "action_logprob": annotation.token_logprob[row, lo:hi].float().tolist(),
        "reward": annotation.reward[row, lo:hi].float().tolist(),
        "terminated": bool(terminated),
    }
