"""The reduced action space A_p(s): the teacher's top-k tokens, cut to the top-p nucleus.

This module is the one place the reduced action space is defined. It is pure torch and imports
nothing else from tdrl.

For teacher logits ``z`` over a vocabulary V at a state s, let ``pi_T = softmax(z)`` and let
``a_1, ..., a_K`` be the K = min(top_k, |V|) most probable tokens in descending probability. Then

    A_p(s) = {a_1, ..., a_m},   m = min{ j : sum_{i <= j} pi_T(a_i | s) >= p }   (m = K if none),

the smallest prefix whose teacher mass reaches p, the crossing token included (Hugging Face's
nucleus-sampling convention). A_p(s) is never empty. Tokens of probability exactly zero (logit
-inf) are never in A_p(s); at p = 1 every other top-k token is.

Cost: one ``topk`` over the vocabulary plus a sort-free cumulative sum over K entries. The full
vocabulary is never sorted (a full ``sort`` over 2048 x 50K rows costs ~30x a ``topk(50)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "exact_top_p",
    "ActionSubset",
    "top_p_subset",
    "nucleus_mask",
    "in_set",
    "validate_top_k",
    "validate_top_p",
]


def validate_top_p(top_p: float) -> float:
    """Return ``top_p`` as a float, or raise ``ValueError`` unless 0 < top_p <= 1."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not (0.0 < float(top_p) <= 1.0) or math.isnan(float(top_p)):
        raise ValueError(
            f"top_p must lie in (0, 1], got {top_p}: use e.g. 0.8 (the paper's default) or 1.0 for no nucleus cut"
        )
    return float(top_p)


def validate_top_k(top_k: int) -> int:
    """Return ``top_k`` as an int, or raise ``ValueError`` unless it is an integer >= 1."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}: use e.g. 64 (tdrl's default cap)")
    return top_k


@dataclass(frozen=True)
class ActionSubset:
    """The teacher's reduced action set at a batch of states (any leading shape ``[...]``).

    Attributes:
        ids: ``[..., K]`` int64 token ids in descending teacher probability.
        logprobs: ``[..., K]`` float32 teacher log-probabilities, normalised over the FULL vocabulary.
        mask: ``[..., K]`` bool, True for the tokens in A_p(s) (always a non-empty prefix).
    """

    ids: Tensor
    logprobs: Tensor
    mask: Tensor

    @property
    def k(self) -> int:
        """Number of candidate slots K."""
        return self.ids.shape[-1]

    def size(self) -> Tensor:
        """``|A_p(s)|`` per state, ``[...]`` int64."""
        return self.mask.sum(-1)

    def mass(self) -> Tensor:
        """Teacher probability inside A_p(s), ``pi_T(A_p(s) | s)``, per state ``[...]``."""
        return torch.where(self.mask, self.logprobs.exp(), torch.zeros_like(self.logprobs)).sum(-1)

    def masked_logprobs(self) -> Tensor:
        """``logprobs`` with ``-inf`` outside A_p(s) (the cached ``cand_logprobs`` format)."""
        return self.logprobs.masked_fill(~self.mask, float("-inf"))

    def dense_mask(self, vocab_size: int) -> Tensor:
        """Bool ``[..., vocab_size]``: True exactly on A_p(s)."""
        dense = torch.zeros(*self.ids.shape[:-1], vocab_size, dtype=torch.bool, device=self.ids.device)
        return dense.scatter(-1, self.ids, self.mask)

    def contains(self, token_ids: Tensor) -> Tensor:
        """Whether each token of ``token_ids`` (shape ``[...]``) lies in A_p(s) at its state."""
        return in_set(self.ids, self.mask, token_ids)

    def to(self, device: torch.device | str) -> ActionSubset:
        return ActionSubset(self.ids.to(device), self.logprobs.to(device), self.mask.to(device))

    def __getitem__(self, index) -> ActionSubset:
        """Index the leading dimensions, e.g. ``subset[:, -1]``."""
        return ActionSubset(self.ids[index], self.logprobs[index], self.mask[index])


def top_p_subset(logits: Tensor, top_k: int = 64, top_p: float = 0.8) -> ActionSubset:
    """Top-k, then top-p, over the last dimension of ``logits`` ``[..., V]``.

    Args:
        logits: floating tensor of teacher logits (any scale; normalised here over the full vocabulary).
        top_k: cap K on the number of candidates (K = min(top_k, V)); keeps caches fixed-size.
        top_p: nucleus mass p in (0, 1]; 0.8 is the paper's default.

    Returns:
        An :class:`ActionSubset` with ``ids``/``logprobs``/``mask`` of shape ``[..., K]``.

    Raises:
        ValueError: for ``top_p`` outside (0, 1], ``top_k < 1``, non-floating logits, or a row whose
            logits are all -inf or contain NaN (no distribution to cut).
    """
    top_p = validate_top_p(top_p)
    top_k = validate_top_k(top_k)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor [..., V], got {got}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")

    k = min(top_k, logits.shape[-1])
    log_z = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    if not torch.isfinite(log_z).all():
        raise ValueError("logits contain NaN, +inf, or a row that is entirely -inf: no distribution to take top-p of")
    top_logits, ids = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    logprobs = top_logits.float() - log_z

    return ActionSubset(ids=ids, logprobs=logprobs, mask=nucleus_mask(logprobs, top_p))


def exact_top_p(logits: Tensor, top_p: float, start_k: int = 64) -> ActionSubset:
    """The nucleus A_p with no top-k cap, without sorting the vocabulary: :func:`top_p_subset` at
    k = ``start_k``, and k doubled while some row's top-k holds less than ``top_p`` of its mass (then
    its nucleus may reach past k). Equal to the sort-everything nucleus; the returned subset has
    K = the final k columns."""
    vocab = logits.shape[-1]
    k = min(start_k, vocab)
    while True:
        subset = top_p_subset(logits, top_k=k, top_p=top_p)
        if k >= vocab or bool((subset.mass() >= top_p).all()):
            return subset
        k = min(2 * k, vocab)


def in_set(cand_ids: Tensor, cand_mask: Tensor, token_ids: Tensor) -> Tensor:
    """Whether each token of ``token_ids`` ``[...]`` lies in A_p(s) = the ``cand_ids`` ``[..., K]`` where
    ``cand_mask`` is True. The one membership test: it is derived wherever A_p(s) is used (a stored
    copy goes stale when A_p(s) is re-cut at another p)."""
    return ((cand_ids == token_ids.unsqueeze(-1).to(cand_ids.dtype)) & cand_mask.bool()).any(-1)


def nucleus_mask(logprobs: Tensor, top_p: float) -> Tensor:
    """A_p over candidates sorted by descending probability (``logprobs`` ``[..., K]``, normalised
    over the full vocabulary): the smallest prefix reaching mass ``top_p``, the crossing token
    included, ``-inf`` entries never in. Also re-cuts a cached annotation at a smaller p."""
    top_p = validate_top_p(top_p)
    finite = torch.isfinite(logprobs)
    if top_p >= 1.0:
        return finite
    # mass strictly before each candidate, in float64 so the cut matches an exact cumulative sum
    wide = logprobs.float() if logprobs.device.type == "mps" else logprobs.double()  # MPS has no float64
    cumulative = wide.exp().cumsum(-1)
    mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    return (mass_before < top_p) & finite
