"""The batch as an agent sees it: :class:`Transitions` (the response positions of a batch as N
transitions, with the states' hidden vectors) and :class:`Policy` (the student's logits on the MDP's
support, at the teacher's candidates and at the data token, with the decoding normaliser computed on
first use). :class:`~tdrl.agents.base.Agent` builds both; agents read them in ``loss``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Transitions", "Policy"]


@dataclass
class Transitions:
    """The response positions of a batch as N transitions, flattened row-major.

    ``hidden`` holds M >= N states: every state s of a transition and every next state s' (the final
    state s_T of each response included). ``cur`` and ``nxt`` index into it. Per-state fields
    (``cand_*``) are ``[M, ...]``; per-transition fields are ``[N]``:

    * ``terminal``: s' is terminal (the response ended there: EOS, or an env episode ended by
      ``off_support="terminate"``): V(s') = 0. A response cut at the length limit is not terminal: its
      last transition bootstraps V(s_T) on A_p(s_T);
    * ``last``: the last transition of its sequence (terminal or truncated);
    * ``action_in_set``: the data token lies in A_p(s), derived from ``cand_ids`` / ``cand_mask`` at s
      (never read from the data: the sets may have been re-cut).
    ``behaviour_logprob`` / ``student_logprob`` (``[N]``, or None for offline data) are the log-probs
    under which online episodes were sampled: the behaviour policy and the student at that time.
    """

    hidden: Tensor
    cur: Tensor
    nxt: Tensor
    cand_ids: Tensor
    cand_mask: Tensor
    cand_logprobs: Tensor
    actions: Tensor
    reward: Tensor
    terminal: Tensor
    last: Tensor
    action_in_set: Tensor
    action_logprob: Tensor
    behaviour_logprob: Tensor | None = None
    student_logprob: Tensor | None = None
    _log_z: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.cur.shape[0])


@dataclass
class Policy:
    """The student's (or another head's) logits at R states: on the support S of the MDP's sums
    (``logits`` / ``mask``, ``[R, S]``: A_p(s) with S = K, or the whole vocabulary for
    ``restrict="none"``), at the teacher's candidates (``cand``, ``[R, K]``, A_p(s) = ``cand_mask``),
    and at each transition's data token (``action``, ``[N]``). :attr:`log_z` ``[R]`` normalises the
    decoding policy (over V, or over A_p(s) for ``restrict="set"``); it is computed on first use, so
    an agent that never asks for it never pays for the full-vocabulary pass. ``log_z_support`` ``[R]``
    is the log-sum-exp over the support, ``log_z_set`` over A_p(s). ``rows`` maps each transition to
    its row (``t.cur`` for all M states, ``arange(N)`` for the transition states). Every logit is
    already divided by the temperature the policy was built with.
    """

    logits: Tensor
    mask: Tensor
    cand: Tensor
    cand_mask: Tensor
    action: Tensor
    action_in_set: Tensor
    log_z_support: Tensor
    log_z_set: Tensor
    rows: Tensor
    normaliser: Callable[[], Tensor] | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def log_z(self) -> Tensor:
        return self.log_z_support if self.normaliser is None else self.normaliser()

    def log_probs(self) -> Tensor:
        """``log pi_S(a|s)`` on the support ``[R, S]`` (``-inf`` outside it)."""
        return (self.logits - self.log_z.unsqueeze(-1)).masked_fill(~self.mask, float("-inf"))

    def cand_log_probs(self) -> Tensor:
        """``log pi_S(a|s)`` at the teacher's candidates ``[R, K]`` (finite everywhere)."""
        return self.cand - self.log_z.unsqueeze(-1)

    def action_log_prob(self) -> Tensor:
        """``log pi_S(a_data|s)`` per transition ``[N]``."""
        return self.action - self.log_z[self.rows]

    def log_mass_in_set(self) -> Tensor:
        """``log pi_S(A_p(s)|s)`` ``[R]`` of the decoding policy (0 for ``restrict="set"``)."""
        return self.log_z_set - self.log_z
