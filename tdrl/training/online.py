"""What a run adds to its offline data: the student's own episodes (GKD / MiniLLM), sampled from the
agent's ``behaviour`` hook, and MiniLLM's pre-training term J_PT on plain text (with the teacher's
top-k of every chunk computed once), handed to the agent as an auxiliary loss term
(:meth:`PretrainText.term`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tdrl.actions import in_set
from tdrl.agents import AuxiliaryTerm
from tdrl.agents.ops import pretrain_loss
from tdrl.errors import DataError

__all__ = ["collect_episodes", "lm_chunks", "PretrainText"]


def collect_episodes(
    agent,
    teacher,
    prompts: list[str],
    *,
    num_envs: int,
    episodes: int,
    max_new_tokens: int,
    top_k: int,
    top_p: float,
    seed: int,
) -> tuple[list[dict], dict[str, float]]:
    """Student episodes through the vector env (the teacher scores and masks every step), sampled from
    the agent's behaviour distribution (:meth:`tdrl.agents.Agent.behaviour`: the student's decoding
    policy, or MiniLLM's teacher mixture); returns the records and the ``rollout/*`` metrics. The
    trainer collects them when ``online_every`` > 0, which an ``on_policy`` agent's preset sets."""
    from tdrl.envs import StudentPolicy, TokenGenerationVectorEnv, rollout

    env = TokenGenerationVectorEnv(
        teacher, prompts, num_envs=num_envs, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens
    )
    policy = StudentPolicy(agent, seed=seed)
    records = rollout(env, policy, episodes, seed=seed)
    lengths = [len(r["response_ids"]) for r in records]
    inside = sum(
        int(in_set(*(torch.as_tensor(r[k]) for k in ("cand_ids", "cand_mask", "response_ids"))).sum()) for r in records
    )
    tokens = max(sum(lengths), 1)
    return records, {
        "rollout/return": float(np.mean([r["return"] for r in records])),
        "rollout/length": float(np.mean(lengths)),
        "rollout/coverage": inside / tokens,
        "rollout/off_support_rate": 1.0 - inside / tokens,
    }


def lm_chunks(tokenizer, corpus: str, seq_len: int) -> torch.Tensor:
    """``[N, seq_len]`` token chunks of a plain-text corpus ('pydoc': the standard library's
    ``pydoc_data.topics`` text, always available offline; else a path to a UTF-8 text file)."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
    else:
        path = Path(corpus)
        if not path.is_file():
            raise DataError(f"lm_corpus {corpus!r} is neither 'pydoc' nor an existing text file")
        text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"lm_corpus {corpus!r} has fewer than lm_seq_len={seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class PretrainText:
    """J_PT's inputs: chunks of a corpus, each with the teacher's top-k next-token distribution
    (renormalised), computed the first time the chunk is drawn and kept (the corpus is fixed, the
    teacher frozen). :meth:`batch` draws ``batch_size`` chunks with a generator seeded by the step;
    :meth:`term` wraps them as the auxiliary loss term the trainer passes to ``agent(batch, auxiliary=...)``."""

    def __init__(self, teacher, corpus: str, seq_len: int, batch_size: int, top_k: int, seed: int):
        self.teacher, self.batch_size, self.top_k, self.seed = teacher, batch_size, top_k, seed
        self.chunks = lm_chunks(teacher.tokenizer, corpus, seq_len)
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, 2])
        picks = rng.choice(len(self.chunks), size=self.batch_size, replace=len(self.chunks) < self.batch_size)
        missing = [int(i) for i in dict.fromkeys(picks.tolist()) if int(i) not in self.targets]
        if missing:
            subset = self.teacher.annotate(self.chunks[missing], top_k=self.top_k, top_p=1.0).subset
            for j, i in enumerate(missing):
                self.targets[i] = (subset.ids[j, :-1].cpu(), torch.softmax(subset.logprobs[j, :-1].cpu(), -1))
        return {
            "input_ids": self.chunks[torch.as_tensor(picks)],
            "cand_ids": torch.stack([self.targets[int(i)][0] for i in picks]),
            "cand_probs": torch.stack([self.targets[int(i)][1] for i in picks]),
        }

    def term(self, index: int, coef: float) -> AuxiliaryTerm:
        """J_PT on micro-batch ``index``'s chunks (:meth:`batch`) as an :class:`~tdrl.agents.AuxiliaryTerm`
        named ``lm`` with weight ``coef``: its value ``0.5 * NLL + 0.5 * KD`` is
        :func:`~tdrl.agents.ops.pretrain_loss`, logged as ``loss/lm`` (unweighted) with ``loss/lm_nll``
        and ``loss/lm_kd``."""
        return AuxiliaryTerm("lm", coef, self.batch(index), _pretrain_term)


def _pretrain_term(agent, inputs: dict[str, torch.Tensor]):
    """The J_PT term's function: :func:`~tdrl.agents.ops.pretrain_loss` of the agent's student."""
    device = agent.student.device
    ids, cand_ids, cand_probs = (inputs[k].to(device) for k in ("input_ids", "cand_ids", "cand_probs"))
    return pretrain_loss(agent.student, ids, cand_ids, cand_probs, chunk=agent.config.vocab_chunk)
