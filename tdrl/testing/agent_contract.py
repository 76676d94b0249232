"""The agent conformance kit: every agent, built in or plugged in, passes these checks.

    from tdrl.testing.agent_contract import run_agent_contract
    run_agent_contract("my-agent")             # raises AssertionError naming the failed check

Or one parametrised pytest call over :data:`CHECKS`::

    @pytest.mark.parametrize("check", CHECKS)
    def test_my_agent(check):
        check("my-agent")

The checks: ``agent(batch)`` returns a finite scalar and named, detached metrics (none in a group
the trainer logs itself; ``policy/outside_mass`` among the diagnostics); gradients reach the
student; logits outside A_p(s) reach the loss only through the full-vocabulary normaliser (and not
at all for ``restrict="set"``); ``state_dict`` round-trips (target networks and heads included);
training is deterministic under a seed; on a :class:`~tdrl.testing.MarkovTeacher` problem with a
tabular student the decoded policy converges to its method's fixed point on A_p(s), computed by
brute force (the teacher's policy for every loss that targets it); a network student whose most
likely token lies outside A_p(s) at half of the states keeps its mass on A_p(s); a student
started from a teacher-like table keeps its mass on A_p(s) while it trains (V >> K); and the hooks
the trainer reads (the teacher given at construction, ``behaviour``, ``on_policy``'s preset,
auxiliary loss terms, the student policy's extras: :mod:`tdrl.testing.hooks`). Agents with
``needs_teacher`` get the problem's teacher (:func:`kit_teacher` on the tiny-model batches).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import Tensor, nn

from tdrl.agents.base import TRAINER_METRIC_GROUPS, Agent
from tdrl.testing.fixed_points import markov_fixed_point, markov_transitions
from tdrl.testing.hooks import check_auxiliary_term, check_behaviour, check_student_policy, check_teacher_hook
from tdrl.testing.problems import TabularStudent, contract_batch, kit_teacher, markov_batch
from tdrl.testing.problems import kit_agent as _agent

__all__ = [
    "TabularStudent",
    "kit_teacher",
    "contract_batch",
    "markov_batch",
    "check_loss_and_metrics",
    "check_gradients_reach_student",
    "check_outside_logits",
    "check_state_dict_round_trip",
    "check_deterministic",
    "check_learns_on_markov",
    "learn_on_markov",
    "markov_fixed_point",
    "markov_transitions",
    "check_keeps_support",
    "check_keeps_support_network",
    "check_teacher_hook",
    "check_behaviour",
    "check_auxiliary_term",
    "check_student_policy",
    "support_run",
    "CHECKS",
    "run_agent_contract",
]


def _trainable(agent: Agent):
    return [p for p in agent.parameters() if p.requires_grad]


@contextlib.contextmanager
def one_thread():
    """The kit's problems are tiny tensors: intra-op threads only cost, and on a busy machine they cost
    a lot (a 1 s run took 60 s with 2 threads beside another process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(agent: Agent, batch, steps: int, lr: float, collect=None) -> list[float]:
    """Adam on ``agent(batch)``, on one thread; for an on-policy agent, ``collect()`` replaces the batch
    with fresh student episodes every 10 steps."""
    optimiser = torch.optim.Adam(_trainable(agent), lr=lr)
    losses = []
    with one_thread():
        for step in range(steps):
            if collect is not None and step % 10 == 0:
                batch = collect(step)
            loss, _ = agent(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            agent.after_update()
            losses.append(loss.item())
    return losses


def check_loss_and_metrics(name: str, **overrides) -> None:
    agent = _agent(name, **overrides)
    loss, metrics = agent(contract_batch(), diagnostics=True)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, f"{name}: loss must be a scalar tensor"
    assert torch.isfinite(loss), f"{name}: loss is not finite ({loss.item()})"
    assert metrics and all(isinstance(k, str) and "/" in k for k in metrics), f"{name}: metrics need 'group/name' keys"
    for key, value in metrics.items():
        assert not key.startswith(TRAINER_METRIC_GROUPS), f"{name}: metric {key} uses a group the trainer logs"
        ok = isinstance(value, float) or (
            isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
        )
        assert ok, f"{name}: metric {key} must be a float or a detached 0-dim tensor, got {value!r}"
    outside = float(metrics["policy/outside_mass"])
    assert 0.0 <= outside <= 1.0, f"{name}: policy/outside_mass {outside} is not a probability"
    assert agent.description, f"{name}: set a one-line description"


def check_gradients_reach_student(name: str, **overrides) -> None:
    agent = _agent(name, **overrides)
    loss, _ = agent(contract_batch())
    loss.backward()
    grads = [p.grad for p in agent.student.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), f"{name}: no gradient reaches the student"
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients"


def _vocab_heads(agent: Agent):
    """Every vocabulary-sized linear head of the agent (the LM head, a Q head ...)."""
    vocab = agent.student.vocab_size
    return [m for m in agent.modules() if isinstance(m, nn.Linear) and m.weight.shape[0] == vocab]


def check_outside_logits(name: str, **overrides) -> None:
    """Tokens in no A_p(s) of the batch (and not data tokens) reach the loss only through the
    full-vocabulary normaliser or maximum: permuting their logits among themselves changes nothing.
    With ``restrict="set"`` (the set-only normaliser) they do not reach it at all: adding noise to
    their logits changes nothing."""
    agent = _agent(name, **overrides)
    if agent.config.restrict == "none":
        return
    batch = contract_batch()
    loss_a, _ = agent(batch)
    used = set(batch["cand_ids"][batch["cand_mask"]].tolist()) | set(batch["input_ids"].flatten().tolist())
    unused = torch.tensor([i for i in range(agent.student.vocab_size) if i not in used])
    shuffled = unused[torch.randperm(len(unused), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        for module in _vocab_heads(agent):
            if agent.config.restrict == "set":
                module.weight[unused] += 5.0 * torch.randn_like(module.weight[unused])
                if module.bias is not None:
                    module.bias[unused] += 3.0
            else:
                module.weight[unused] = module.weight[shuffled].clone()
                if module.bias is not None:
                    module.bias[unused] = module.bias[shuffled].clone()
    loss_b, _ = agent(batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5), f"{name}: logits outside A_p(s) changed the loss"


def check_state_dict_round_trip(name: str, **overrides) -> None:
    batch = contract_batch()
    agent = _agent(name, **overrides)
    _train(agent, batch, steps=3, lr=1e-2)  # so target networks differ from the online ones
    clone = _agent(name, **overrides)
    clone.load_state_dict(copy.deepcopy(agent.state_dict()))
    for (ka, va), (kb, vb) in zip(agent.state_dict().items(), clone.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"{name}: state_dict entry {ka} did not round-trip"
    assert torch.equal(agent(batch)[0], clone(batch)[0]), f"{name}: loss differs after load_state_dict"


def check_deterministic(name: str, **overrides) -> None:
    batch = contract_batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(_train(_agent(name, **overrides), batch, steps=3, lr=1e-2))
    assert runs[0] == runs[1], f"{name}: two seeded runs differ: {runs}"


def _decoded_table(agent: Agent) -> Tensor:
    """``[V, V]`` float64: the decoding policy's logits at each state (last token) of a tabular student."""
    vocab = agent.student.vocab_size
    with torch.no_grad():
        states = torch.arange(vocab).unsqueeze(0)
        return agent.policy_logits(agent.student.hidden_states(states)[0]).double()


def projected_kl(agent: Agent, target: dict[int, dict[int, float]], rows) -> float:
    """E_s KL(target(.|s) || proj_p pi_S(.|s)) over the transitions' states (a data-weighted average)
    that the target covers (IQL's covers only states with data inside A_p(s))."""
    table = _decoded_table(agent)
    rows = [row for row in rows if row["s"] in target]
    total = 0.0
    for row in rows:
        A = row["set"]
        student = torch.log_softmax(table[row["s"]][A], 0)
        weights = torch.tensor([target[row["s"]][a] for a in A], dtype=torch.float64)
        p = weights / weights.sum()
        inside = p > 0
        total += float((p[inside] * (p[inside].log() - student[inside])).sum())
    return total / max(len(rows), 1)


def learn_on_markov(name: str, steps: int = 600, **overrides) -> tuple[float, float, str, float]:
    """A tabular student started from the reverse of a Markov teacher's table (it prefers what the
    teacher avoids) trains ``steps`` Adam steps on episodes of the teacher's policy on A_p(s) (V = 8,
    p = 0.9, horizon 6: most episodes are truncated and bootstrap; on-policy agents on their own
    episodes, collected every 10 steps). Returns KL(target || proj_p pi_S) before and after, averaged
    over the data states, with the target of :func:`markov_fixed_point` (computed after training, as
    BD's depends on the student's own maximum), the target's name and its tolerance."""
    batch, teacher = markov_batch(vocab_size=8, scale=1.5, top_p=0.9, episodes=128)
    torch.manual_seed(0)
    student = TabularStudent(teacher.vocab_size, teacher.tokenizer)
    with torch.no_grad():
        student.model.weight.copy_(-teacher.model.table.T.float())
    agent = _agent(name, student, teacher, **overrides)
    oracle, description, tol = markov_fixed_point(agent)  # tdrl.testing.fixed_points
    from tdrl.testing.support import own_episodes

    collect = own_episodes(agent, teacher, top_k=8, top_p=0.9, horizon=6)
    rows = markov_transitions(batch)
    start = copy.deepcopy(agent)
    losses = _train(agent, batch, steps=steps, lr=0.05, collect=collect)
    assert math.isfinite(losses[-1]), f"{name}: loss diverged on the Markov problem"
    target = oracle(agent, teacher, rows)
    return projected_kl(start, target, rows), projected_kl(agent, target, rows), description, tol


def check_learns_on_markov(name: str, steps: int = 600, tol: float | None = None, **overrides) -> None:
    """The right fixed point: trained on a Markov teacher (:func:`learn_on_markov`), the student's
    decoded policy, projected on A_p(s), ends within ``tol`` nats (KL, averaged over the data states;
    default: the oracle's own) of the fixed point its method has (:func:`markov_fixed_point`: the
    projected teacher unless the agent is a built-in whose method targets something else, each
    computed by brute force) and below a quarter of where it started."""
    before, after, description, own_tol = learn_on_markov(name, steps, **overrides)
    tol = own_tol if tol is None else tol
    assert after < tol and after < 0.25 * before, (
        f"{name}: KL to its fixed point ({description}) on A_p(s) {before:.4f} -> {after:.4f}"
    )


def support_run(name: str, steps: int = 300, lr: float = 0.05, **overrides) -> tuple[float, float]:
    """A tabular student started from the teacher's own table (plus noise) on a Markov teacher with a
    vocabulary much larger than its sets (V = 64, K = 8, p = 0.8) trains ``steps`` Adam steps; returns
    its mean mass on A_p(s) over the data states, ``(before, after)``."""
    batch, teacher = markov_batch(vocab_size=64, top_k=8, scale=4.0, episodes=32, horizon=6)
    torch.manual_seed(0)
    student = TabularStudent(teacher.vocab_size, teacher.tokenizer)
    with torch.no_grad():
        start = teacher.logprobs.float().T  # logits(s) = W[:, s]
        student.model.weight.copy_(start + 0.1 * torch.randn_like(start))
    agent = _agent(name, student, teacher, **overrides)

    def mass() -> float:
        with torch.no_grad():
            t = agent.transitions(batch)
            return 1.0 - float(agent.diagnostics(t)["policy/outside_mass"])

    before = mass()
    _train(agent, batch, steps=steps, lr=lr)
    return before, mass()


def check_keeps_support(name: str, margin: float = 0.05, **overrides) -> None:
    """The decoding student keeps its mass on A_p(s): from a teacher-like start (mass on A_p(s) about
    0.8), training does not lower pi_S(A_p(s)|s) by more than ``margin`` (the set-only normaliser
    fails this: it leaves that mass free)."""
    before, after = support_run(name, **overrides)
    assert after >= before - margin, f"{name}: mass on A_p(s) fell from {before:.3f} to {after:.3f}"


def check_keeps_support_network(name: str, margin: float = 0.05, **overrides) -> None:
    """The support check from a start a real student resembles: a small network (one shared LM head)
    whose most likely token lies outside A_p(s) at about half of the states
    (:func:`tdrl.testing.support.check_keeps_support_network`, where the maths is). BD's released
    objective (max over V with chi^2) fails it, as derived there."""
    from tdrl.testing.support import check_keeps_support_network as check

    check(name, margin, **overrides)


CHECKS = (
    check_loss_and_metrics,
    check_gradients_reach_student,
    check_outside_logits,
    check_state_dict_round_trip,
    check_deterministic,
    check_learns_on_markov,
    check_keeps_support,
    check_keeps_support_network,
    check_teacher_hook,
    check_behaviour,
    check_auxiliary_term,
    check_student_policy,
)


def run_agent_contract(name: str, **overrides) -> None:
    """Run every check of the kit on agent ``name`` (config ``overrides`` passed to each)."""
    for check in CHECKS:
        check(name, **overrides)
