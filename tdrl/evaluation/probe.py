"""The support probe: where the decoding policy puts its mass on fixed training states."""

from __future__ import annotations

import torch

from tdrl.data import collate

__all__ = ["support_probe"]


@torch.no_grad()
def support_probe(agent, dataset, pad_token_id: int, n: int = 64) -> dict[str, float]:
    """The decoding policy's ``outside_mass`` (its exact mass outside A_p(s)) and ``mode_outside`` (how
    often its most likely token lies outside A_p(s)) over the response states of the first ``n``
    records of ``dataset`` (a :class:`~tdrl.data.DistillDataset`): one fixed probe, comparable across
    agents and with the starting student (``agent.diagnostics``, state-weighted)."""
    totals, states = {"outside_mass": 0.0, "mode_outside": 0.0}, 0
    for start in range(0, min(n, len(dataset)), 8):
        rows = range(start, min(start + 8, n, len(dataset)))
        t = agent.transitions(collate([dataset[i] for i in rows], pad_token_id))
        found = agent.diagnostics(t)
        for key in totals:
            totals[key] += float(found[f"policy/{key}"]) * t.n
        states += t.n
    return {key: value / max(states, 1) for key, value in totals.items()}
