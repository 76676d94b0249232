"""The agent conformance kit: every agent, built in or plugged in, passes these checks.

    from tdrl.testing.agent_contract import run_agent_contract
    run_agent_contract("my-agent")             # raises AssertionError naming the failed check

Or one parametrised pytest call over :data:`CHECKS`::

    @pytest.mark.parametrize("check", CHECKS)
    def test_my_agent(check):
        check("my-agent")

The checks: ``loss`` returns a finite scalar and named float metrics; gradients reach the student;
the restricted loss ignores logits outside A_p(s); ``state_dict`` round-trips (target networks and
heads included); training is deterministic under a seed; a few hundred updates on a
:class:`~tdrl.testing.MarkovTeacher` problem with a tabular student reduce the loss.
"""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import torch
from torch import nn

from tdrl.agents.base import Agent, make_agent
from tdrl.records import record_tensors
from tdrl.students import Student

__all__ = [
    "TabularStudent",
    "contract_batch",
    "markov_batch",
    "check_loss_and_metrics",
    "check_gradients_reach_student",
    "check_mask_respected",
    "check_state_dict_round_trip",
    "check_deterministic",
    "check_learns_on_markov",
    "CHECKS",
    "run_agent_contract",
]


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


def _tiny_student():
    from tdrl.students import load_student

    torch.manual_seed(0)
    return load_student("tiny")


def contract_batch(num_records: int = 4, max_new_tokens: int = 6, top_k: int = 16, top_p: float = 0.8, seed: int = 0):
    """A collated batch of tiny-teacher responses with their annotation (built once, then copied)."""
    return {k: v.clone() for k, v in _contract_batch(num_records, max_new_tokens, top_k, top_p, seed).items()}


@functools.lru_cache(maxsize=4)
def _contract_batch(num_records: int, max_new_tokens: int, top_k: int, top_p: float, seed: int):
    from tdrl.data import collate
    from tdrl.envs import TeacherPolicy, TokenGenerationEnv, rollout
    from tdrl.testing import tiny_teacher

    teacher = tiny_teacher()
    prompts = ["What is the capital of France?", "Name three colors.", "hi", "Define gravity."]
    env = TokenGenerationEnv(teacher, prompts, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    records = rollout(env, TeacherPolicy(seed=seed, temperature=1.5), num_records, seed=seed)
    items = [record_tensors(r) for r in records]
    batch = collate(items, teacher.pad_token_id)
    # make row 0's second action a token outside its A_p(s), so every agent meets that case
    pos = int(torch.nonzero(batch["response_mask"][0])[1])
    outside = next(a for a in range(teacher.vocab_size) if a not in set(batch["cand_ids"][0, pos].tolist()))
    batch["input_ids"][0, pos + 1] = outside
    batch["action_in_cand"][0, pos] = False
    return batch


def markov_batch(vocab_size: int = 5, episodes: int = 64, horizon: int = 6, top_p: float = 0.8, seed: int = 3):
    """Episodes of the Markov teacher's own policy (projected on A_p), collated, and the teacher."""
    from tdrl.data import collate
    from tdrl.envs import TeacherPolicy, TokenGenerationVectorEnv, rollout
    from tdrl.testing import MarkovTeacher

    teacher = MarkovTeacher(vocab_size=vocab_size, seed=seed, eos_bias=-1.0)
    env = TokenGenerationVectorEnv(teacher, [[0]], num_envs=8, top_k=vocab_size, top_p=top_p, max_new_tokens=horizon)
    records = rollout(env, TeacherPolicy(seed=seed), episodes, seed=seed)
    items = [record_tensors(r) for r in records]
    return collate(items, teacher.pad_token_id), teacher


def _agent(name: str, student=None, **overrides) -> Agent:
    return make_agent(name, student if student is not None else _tiny_student(), **overrides)


def _trainable(agent: Agent):
    return [p for p in agent.parameters() if p.requires_grad]


def _train(agent: Agent, batch, steps: int, lr: float) -> list[float]:
    optimiser = torch.optim.Adam(_trainable(agent), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = agent.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        agent.after_update()
        losses.append(loss.item())
    return losses


def check_loss_and_metrics(name: str, **overrides) -> None:
    agent = _agent(name, **overrides)
    loss, metrics = agent.loss(contract_batch())
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, f"{name}: loss must be a scalar tensor"
    assert torch.isfinite(loss), f"{name}: loss is not finite ({loss.item()})"
    assert metrics and all(isinstance(k, str) and "/" in k for k in metrics), f"{name}: metrics need 'group/name' keys"
    assert all(isinstance(v, float) for v in metrics.values()), f"{name}: metric values must be floats"
    assert agent.description, f"{name}: set a one-line description"


def check_gradients_reach_student(name: str, **overrides) -> None:
    agent = _agent(name, **overrides)
    loss, _ = agent.loss(contract_batch())
    loss.backward()
    grads = [p.grad for p in agent.student.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), f"{name}: no gradient reaches the student"
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients"


def check_mask_respected(name: str, **overrides) -> None:
    """Changing the logits of tokens in no A_p(s) of the batch (and not data tokens) changes nothing."""
    agent = _agent(name, **overrides)
    if agent.config.restrict != "topp":
        return
    batch = contract_batch()
    loss_a, metrics_a = agent.loss(batch)
    used = set(batch["cand_ids"][batch["cand_mask"]].tolist()) | set(batch["input_ids"].flatten().tolist())
    unused = torch.tensor([i for i in range(agent.student.vocab_size) if i not in used])
    with torch.no_grad():
        for module in agent.modules():  # every vocabulary-sized head: the LM head, a Q head ...
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and weight.shape[0] == agent.student.vocab_size:
                weight[unused] += 5.0 * torch.randn_like(weight[unused])
                if module.bias is not None:
                    module.bias[unused] += 3.0
    loss_b, _ = agent.loss(batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5), f"{name}: logits outside A_p(s) changed the loss"


def check_state_dict_round_trip(name: str, **overrides) -> None:
    batch = contract_batch()
    agent = _agent(name, **overrides)
    _train(agent, batch, steps=3, lr=1e-2)  # so target networks differ from the online ones
    clone = _agent(name, **overrides)
    clone.load_state_dict(copy.deepcopy(agent.state_dict()))
    for (ka, va), (kb, vb) in zip(agent.state_dict().items(), clone.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"{name}: state_dict entry {ka} did not round-trip"
    assert torch.equal(agent.loss(batch)[0], clone.loss(batch)[0]), f"{name}: loss differs after load_state_dict"


def check_deterministic(name: str, **overrides) -> None:
    batch = contract_batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(_train(_agent(name, **overrides), batch, steps=3, lr=1e-2))
    assert runs[0] == runs[1], f"{name}: two seeded runs differ: {runs}"


def check_learns_on_markov(name: str, steps: int = 300, **overrides) -> None:
    batch, teacher = markov_batch()
    torch.manual_seed(0)
    agent = _agent(name, TabularStudent(teacher.vocab_size, teacher.tokenizer), **overrides)
    losses = _train(agent, batch, steps=steps, lr=0.05)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(last), f"{name}: loss diverged on the Markov problem"
    assert last < first - 1e-3 * max(1.0, abs(first)), f"{name}: loss did not decrease ({first:.4f} -> {last:.4f})"


CHECKS = (
    check_loss_and_metrics,
    check_gradients_reach_student,
    check_mask_respected,
    check_state_dict_round_trip,
    check_deterministic,
    check_learns_on_markov,
)


def run_agent_contract(name: str, **overrides) -> None:
    """Run every check of the kit on agent ``name`` (config ``overrides`` passed to each)."""
    for check in CHECKS:
        check(name, **overrides)
