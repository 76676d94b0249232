"""The episode record: one (prompt, response) pair with the teacher's view of every response step.

Offline annotation and online rollouts in the environment produce the same record, so the same
agents train on either. Response position i is the state ``prompt + response[:i]`` and its action is
``response[i]``:

=================  ==========================  =====================================================
field              type                        meaning
=================  ==========================  =====================================================
``prompt``         str                         instruction text ("" when given as token ids)
``response``       str                         decoded response
``prompt_ids``     list[int]                   prompt tokens as the models see them (template applied)
``response_ids``   list[int] (n)               the actions
``cand_ids``       list[list[int]] (n x K)     A_p candidates at each state, descending teacher prob.
``cand_logprobs``  list[list[float]] (n x K)   teacher log-probs (full-vocabulary normalised),
                                               ``-inf`` outside A_p(s)
``cand_mask``      list[list[bool]] (n x K)    membership of A_p(s)
``action_logprob`` list[float] (n)             ``log pi_T(response[i] | state i)``
``action_in_cand`` list[bool] (n)              ``response[i] in A_p(state i)``
``reward``         list[float] (n)             the configured teacher reward of each step
``terminated``     bool                        the response ended with EOS (not cut at the limit)
=================  ==========================  =====================================================

Online episodes (the student's own samples) also carry, per response position, the log-probs they
were sampled under: ``behaviour_logprob`` (the behaviour policy, e.g. a student/teacher mixture) and
``student_logprob`` (the student at collection time), so an agent can reuse them with importance
ratios after the student moved (:data:`ONLINE_FIELDS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tdrl.actions import ActionSubset

__all__ = ["RESPONSE_FIELDS", "TRAINING_FIELDS", "ONLINE_FIELDS", "episode_record", "record_tensors"]

#: Per-response-position fields (each a list of length n = len(response_ids)).
RESPONSE_FIELDS = ("cand_ids", "cand_logprobs", "cand_mask", "action_logprob", "action_in_cand", "reward")
#: What :func:`tdrl.data.collate` needs of a record.
TRAINING_FIELDS = ("prompt_ids", "response_ids", *RESPONSE_FIELDS, "terminated")
#: Optional per-position fields of online episodes: the log-probs each token was sampled under.
ONLINE_FIELDS = ("behaviour_logprob", "student_logprob")


def record_tensors(record: dict) -> dict[str, Tensor]:
    """The :data:`TRAINING_FIELDS` of a record (lists or tensors), and its :data:`ONLINE_FIELDS` if
    it has them, as tensors, ready for ``collate``."""
    keys = TRAINING_FIELDS + tuple(k for k in ONLINE_FIELDS if k in record)
    return {key: torch.as_tensor(record[key]) for key in keys}


def episode_record(
    *,
    prompt: str,
    response: str,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    subset: ActionSubset,
    action_logprob: Tensor,
    reward: Tensor,
    terminated: bool,
) -> dict:
    """Build a record from the teacher's subsets ``[n, K]`` and per-step tensors ``[n]``."""
    tokens = [int(t) for t in response_ids]
    n = len(tokens)
    if subset.ids.shape[0] != n or action_logprob.shape[0] != n or reward.shape[0] != n:
        raise ValueError(f"record needs one teacher step per response token ({n}), got {subset.ids.shape[0]}")
    in_cand = subset.contains(torch.tensor(tokens, dtype=torch.long)) if n else torch.zeros(0, dtype=torch.bool)
    return {
        "prompt": prompt,
        "response": response,
        "prompt_ids": [int(t) for t in prompt_ids],
        "response_ids": tokens,
        "cand_ids": subset.ids.tolist(),
        "cand_logprobs": subset.masked_logprobs().tolist(),
        "cand_mask": subset.mask.tolist(),
        "action_logprob": action_logprob.float().tolist(),
        "action_in_cand": in_cand.tolist(),
        "reward": reward.float().tolist(),
        "terminated": bool(terminated),
    }
