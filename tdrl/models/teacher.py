"""The teacher: a frozen causal LM used as reward oracle and action-mask oracle.

At a state s = (prompt, response prefix) the teacher gives

* the reduced action set A_p(s) (:func:`tdrl.actions.top_p_subset` over its next-token logits), and
* a reward r(s, a) for ANY token a (see :class:`Reward`).

Two ways to query it:

* :meth:`Teacher.annotate` scores whole sequences in one forward pass (offline annotation);
* :meth:`~tdrl.models.lm.LM.start` / :meth:`~tdrl.models.lm.LM.step` walk forward one token at a time
  with the KV cache (the environment, generation).

Both agree to float tolerance on the same text (tested). Load one by name with
:func:`tdrl.models.load_teacher`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from tdrl.actions import ActionSubset, top_p_subset
from tdrl.errors import ConfigError
from tdrl.models.lm import LM, model_fingerprint
from tdrl.models.placement import check_in_memory

__all__ = ["Reward", "reward_value", "Annotation", "Teacher", "sparsity_statistics"]


class Reward(str, Enum):
    """How the teacher turns a transition (s, a, s') into a reward. ``z`` are teacher logits.

    * ``logprob`` (default): ``r(s, a) = log pi_T(a | s) = z(s, a) - logsumexp_b z(s, b)``.
      With entropy weight 1 the soft-optimal policy of the full token MDP is the teacher itself:
      ``Q*(s, a) = log pi_T(a | s)`` and ``V*(s) = 0``.
    * ``logit``: ``r(s, a) = z(s, a)``, the raw teacher logit (shift-dependent; for ablations).
    * ``inverse_soft_q``: ``r(s, a) = z(s, a) - gamma * V(s')`` with ``V(s') = logsumexp_b z(s', b)``
      and ``V(s') = 0`` when s' is terminal (a is EOS): the reward IQ-Learn's inverse Bellman
      operator reads off a soft-Q function, taking the teacher's logits as Q.
    """

    LOGPROB = "logprob"
    LOGIT = "logit"
    INVERSE_SOFT_Q = "inverse_soft_q"

    @classmethod
    def parse(cls, value: str | Reward) -> Reward:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(r.value for r in cls)
            raise ConfigError(f"unknown reward {value!r}: choose one of {choices}") from None


def reward_value(
    kind: Reward | str,
    action_logit: Tensor,
    log_z: Tensor,
    next_log_z: Tensor | None = None,
    next_terminal: Tensor | None = None,
    gamma: float = 0.99,
) -> Tensor:
    """The reward of :class:`Reward` ``kind`` from the pieces of teacher logits it needs.

    Args:
        action_logit: ``z(s, a)``, shape ``[...]``.
        log_z: ``logsumexp_b z(s, b)``, shape ``[...]``.
        next_log_z: ``logsumexp_b z(s', b)`` (only for ``inverse_soft_q``).
        next_terminal: bool ``[...]``, s' is terminal (only for ``inverse_soft_q``).
        gamma: discount (only for ``inverse_soft_q``).
    """
    kind = Reward.parse(kind)
    if kind is Reward.LOGPROB:
        return action_logit - log_z
    if kind is Reward.LOGIT:
        return action_logit.clone()
    if next_log_z is None or next_terminal is None:
        raise ValueError("reward 'inverse_soft_q' needs next_log_z and next_terminal")
    next_value = torch.where(next_terminal, torch.zeros_like(next_log_z), next_log_z)
    return action_logit - gamma * next_value


@dataclass(frozen=True)
class Annotation:
    """The teacher's view of whole sequences ``x`` of length T (:meth:`Teacher.annotate`).

    Position t is the state ``x[: t + 1]``; its action is the next token ``x[t + 1]``.

    Attributes:
        subset: ``[B, T, K]`` A_p at every position (for the last position: the distribution of
            the token after the text).
        token_logprob: ``[B, T - 1]`` ``log pi_T(x[t + 1] | x[: t + 1])``.
        reward: ``[B, T - 1]`` the configured :class:`Reward` of taking ``x[t + 1]`` at position t.
        log_z: ``[B, T]`` ``logsumexp`` of the teacher logits at every position.
    """

    subset: ActionSubset
    token_logprob: Tensor
    reward: Tensor
    log_z: Tensor


class Teacher(LM):
    """A frozen causal LM queried as reward and action-set oracle (an :class:`~tdrl.models.lm.LM`
    with :meth:`annotate` and a weights fingerprint). The model is put in eval mode with gradients off.
    """

    def weights_fingerprint(self) -> str:
        """:func:`model_fingerprint` of the teacher's weights, computed once (the teacher is frozen).
        Caches of teacher outputs are keyed by it, so two teachers with one name never share them."""
        if getattr(self, "_weights_fingerprint", None) is None:
            check_in_memory(self.model, self.name)  # offloaded weights (on the meta device) cannot be hashed
            self._weights_fingerprint = model_fingerprint(self.model)
        return self._weights_fingerprint

    def annotate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        top_k: int = 64,
        top_p: float = 0.8,
        reward: Reward | str = Reward.LOGPROB,
        gamma: float = 0.99,
    ) -> Annotation:
        """A_p, the data token's log-prob and the reward at every position of ``input_ids`` ``[B, T]``.

        One forward pass on the teacher's device; the ``[B, T, V]`` logits never leave this call and the
        annotation comes back on the CPU (it is what the cache stores). Padding (left or right) is given
        by ``attention_mask``; values at padded positions are meaningless.
        """
        reward = Reward.parse(reward)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            logits = self._forward_logits(input_ids, attention_mask)
            subset = top_p_subset(logits, top_k=top_k, top_p=top_p)
            log_z = torch.logsumexp(logits, dim=-1)
            nxt = input_ids[:, 1:].to(logits.device)
            action_logit = logits[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            token_logprob = action_logit - log_z[:, :-1]
            value = reward_value(reward, action_logit, log_z[:, :-1], log_z[:, 1:], nxt == self.eos_token_id, gamma)

        def out(t: Tensor) -> Tensor:  # an ordinary CPU tensor (a copy made outside inference mode)
            return t.to("cpu", copy=True)

        return Annotation(
            subset=ActionSubset(out(subset.ids), out(subset.logprobs), out(subset.mask)),
            token_logprob=out(token_logprob),
            reward=out(value),
            log_z=out(log_z),
        )


def sparsity_statistics(
    teacher: Teacher,
    prompts: Sequence[str | Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    top_ps: Sequence[float] = (0.5, 0.8, 0.95),
    top_ks: Sequence[int] = (64, 256),
    top_ns: Sequence[int] = (7, 50),
) -> dict[str, float]:
    """The paper's sparsity statistic over the response states of (prompt, response) pairs.

    For every state from which a response token is chosen, computes ``|A_p(s)|`` and
    ``pi_T(A_p(s)|s)`` for each (k, p), and the teacher mass of its top-n tokens. Returns the means
    under keys ``size@k{k}p{p}``, ``mass@k{k}p{p}``, ``top{n}_mass``, and ``states`` (their count).
    """
    rows = []
    for prompt, response in zip(prompts, responses):
        ids = teacher.encode_prompt(prompt) + [int(t) for t in response]
        n_prompt = len(ids) - len(response)
        logits = teacher.logits(torch.tensor([ids]))[0]
        rows.append(logits[n_prompt - 1 : len(ids) - 1])  # states that chose a response token
    logits = torch.cat(rows)
    stats: dict[str, float] = {"states": float(logits.shape[0])}
    for k in top_ks:
        for p in top_ps:
            subset = top_p_subset(logits, top_k=k, top_p=p)
            stats[f"size@k{k}p{p}"] = subset.size().float().mean().item()
            stats[f"mass@k{k}p{p}"] = subset.mass().mean().item()
    for n in top_ns:
        stats[f"top{n}_mass"] = top_p_subset(logits, top_k=n, top_p=1.0).mass().mean().item()
    return stats
