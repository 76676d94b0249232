"""The kit's problems: the students and teachers its checks run on and the batches they train on
(re-exported by :mod:`tdrl.testing.agent_contract`)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import nn

from tdrl.agents.base import Agent
from tdrl.agents.registry import make_agent
from tdrl.models import Student
from tdrl.records import record_tensors

__all__ = ["TabularStudent", "kit_student", "kit_teacher", "kit_agent", "contract_batch", "markov_batch"]


class _Table(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(0.01 * torch.randn(vocab_size, vocab_size))  # not 0: avoid the symmetric saddle
        self.config = SimpleNamespace(vocab_size=vocab_size)


class TabularStudent(Student):
    """A Q-table as a student: the state is the last token, ``logits(s) = W[:, s]`` (W is ``[V, V]``).

    ``hidden_states`` is the one-hot of each token, so the output embedding is the table itself and
    every agent's maths runs unchanged. For exact checks on Markov teachers.
    """

    def __init__(self, vocab_size: int, tokenizer=None, *, value_head: bool = False):
        super().__init__(_Table(vocab_size), tokenizer, value_head=value_head)

    def hidden_states(self, input_ids, attention_mask=None):
        return nn.functional.one_hot(input_ids, self.model.weight.shape[0]).to(self.model.weight.dtype)

    def output_weight(self):
        return self.model.weight

    def output_bias(self):
        return None

    def full_logits(self, hidden):
        return nn.functional.linear(hidden, self.model.weight)


def kit_student():
    """The tiny student (seeded: every call builds the same one)."""
    from tdrl.models import load_student

    torch.manual_seed(0)
    return load_student("tiny")


@functools.lru_cache(maxsize=1)
def kit_teacher():
    """The tiny teacher the kit's batches and envs are made with (built once, frozen, shared)."""
    from tdrl.testing import tiny_teacher

    return tiny_teacher()


def contract_batch(num_records: int = 4, max_new_tokens: int = 6, top_k: int = 16, top_p: float = 0.8, seed: int = 0):
    """A collated batch of tiny-teacher responses with their annotation (built once, then copied)."""
    return {k: v.clone() for k, v in _contract_batch(num_records, max_new_tokens, top_k, top_p, seed).items()}


@functools.lru_cache(maxsize=4)
def _contract_batch(num_records: int, max_new_tokens: int, top_k: int, top_p: float, seed: int):
    from tdrl.data import collate
    from tdrl.envs import TeacherPolicy, TokenGenerationEnv, rollout

    teacher = kit_teacher()
    prompts = ["What is the capital of France?", "Name three colors.", "hi", "Define gravity."]
    env = TokenGenerationEnv(teacher, prompts, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    records = rollout(env, TeacherPolicy(seed=seed, temperature=1.5), num_records, seed=seed)
    items = [record_tensors(r) for r in records]
    batch = collate(items, teacher.pad_token_id)
    # make row 0's second action a token outside its A_p(s), so every agent meets that case (the agents
    # derive membership from the sets and the next token: nothing else to change)
    pos = int(torch.nonzero(batch["response_mask"][0])[1])
    outside = next(a for a in range(teacher.vocab_size) if a not in set(batch["cand_ids"][0, pos].tolist()))
    batch["input_ids"][0, pos + 1] = outside
    return batch


def markov_batch(
    vocab_size: int = 5,
    episodes: int = 64,
    horizon: int = 6,
    top_p: float = 0.8,
    seed: int = 3,
    top_k: int | None = None,
    scale: float = 2.0,
):
    """Episodes of the Markov teacher's own policy (projected on A_p), collated, and the teacher."""
    return _markov_batch(vocab_size, episodes, horizon, top_p, seed, top_k, scale)


@functools.lru_cache(maxsize=4)
def _markov_batch(vocab_size, episodes, horizon, top_p, seed, top_k, scale):
    from tdrl.data import collate
    from tdrl.envs import TeacherPolicy, TokenGenerationVectorEnv, rollout
    from tdrl.testing import MarkovTeacher

    teacher = MarkovTeacher(vocab_size=vocab_size, seed=seed, eos_bias=-1.0, scale=scale)
    env = TokenGenerationVectorEnv(
        teacher, [[0]], num_envs=8, top_k=top_k or vocab_size, top_p=top_p, max_new_tokens=horizon
    )
    records = rollout(env, TeacherPolicy(seed=seed), episodes, seed=seed)
    items = [record_tensors(r) for r in records]
    return collate(items, teacher.pad_token_id), teacher


def kit_agent(name: str, student=None, teacher=None, **overrides) -> Agent:
    """Agent ``name`` on ``student`` (default: the tiny student) with the kit's teacher (default: the
    tiny one, which :func:`contract_batch` is made with)."""
    teacher = teacher if teacher is not None else kit_teacher()
    return make_agent(name, student if student is not None else kit_student(), teacher=teacher, **overrides)
