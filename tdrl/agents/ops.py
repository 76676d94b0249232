"""The maths every agent shares: masked log-sum-exp and log-softmax, ``log(1 - exp(x))``, Polyak
target networks, the expectile loss, and detaching metrics."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "masked_logsumexp",
    "masked_log_softmax",
    "log1mexp",
    "detached",
    "TargetNetwork",
    "expectile_loss",
    "pretrain_loss",
]


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` over the entries where ``mask`` is True; 0 for rows with no such entry (their
    gradient is 0, not NaN)."""
    any_valid = mask.any(dim, keepdim=True)
    safe = mask | ~any_valid & (torch.arange(mask.shape[dim], device=mask.device) == 0)
    out = x.masked_fill(~safe, float("-inf")).logsumexp(dim)
    return torch.where(any_valid.squeeze(dim), out, torch.zeros_like(out))


def masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over the masked entries of the last dim; ``-inf`` elsewhere."""
    return (x - masked_logsumexp(x, mask).unsqueeze(-1)).masked_fill(~mask, float("-inf"))


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends. ``x`` is clamped at -1e-7 (so the
    result is at least about -16 and its gradient finite where rounding puts a log-mass at 0)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def detached(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with every tensor detached (the trainer turns them into floats only at log time)."""
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in metrics.items()}


class TargetNetwork:
    """A frozen copy of a module updated by Polyak averaging: ``theta' <- (1 - tau) theta' + tau theta``."""

    @staticmethod
    def make(module: nn.Module) -> nn.Module:
        target = copy.deepcopy(module)
        target.requires_grad_(False)
        return target.eval()

    @staticmethod
    @torch.no_grad()
    def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s.detach(), tau)


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """``mean(|tau - 1(u < 0)| * u^2)`` for ``u = diff`` (IQL's asymmetric L2; tau = 0.5 is MSE / 2)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def pretrain_loss(student, input_ids: Tensor, cand_ids: Tensor, cand_probs: Tensor, chunk: int) -> tuple[Tensor, dict]:
    """MiniLLM's pre-training term J_PT on plain text: ``0.5 * NLL + 0.5 * KD``, the student's
    next-token log-likelihood of the text and the cross-entropy from the teacher's top-k (``cand_ids``
    ``[B, T-1, k]`` with their renormalised probabilities ``cand_probs``) to the student, both normalised
    over the whole vocabulary by the chunked normaliser (no ``[B, T, V]`` tensor)."""
    from tdrl.models.student import gather_logits, vocab_logsumexp

    hidden = student.hidden_states(input_ids)[:, :-1]
    weight, bias = student.output_weight(), student.output_bias()
    log_z = vocab_logsumexp(hidden, weight, bias, chunk=chunk)
    nll = (log_z - gather_logits(hidden, weight, bias, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()).mean()
    kd = -(cand_probs * (gather_logits(hidden, weight, bias, cand_ids).float() - log_z.unsqueeze(-1))).sum(-1).mean()
    loss = 0.5 * nll + 0.5 * kd
    return loss, {"loss/lm": loss.detach(), "loss/lm_nll": nll.detach(), "loss/lm_kd": kd.detach()}
