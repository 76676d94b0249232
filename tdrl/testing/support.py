"""The support check with a network student: a shared logit scale and a most likely token outside A_p(s).

:func:`~tdrl.testing.agent_contract.support_run` starts a *tabular* student from the teacher's own
table: every state owns its logits, and the student's argmax lies in A_p(s) everywhere. Two things a
real student has are missing there:

* a shared logit scale: one LM head ``W [V, d]``, ``b [V]`` over a shared trunk, so what a loss does
  to the logits at one state moves them at every other state too;
* states where the student's most likely token lies OUTSIDE the teacher's set A_p(s) (a pretrained
  student disagrees with its teacher at many states).

The second matters for losses that read the maximum logit over the whole vocabulary, like IQ-Learn /
BD with the paper's code form ``Q(s, a) = z_a(s) - max_{b in V} z_b(s)`` (clipped at ``q_min``),
``V(s) = logsumexp_{a in A_p(s)} Q(s, a)`` and chi^2. Where the argmax lies inside A_p(s), its Q is
pinned at 0 and the loss can only sharpen the set. Where it lies outside, every Q on A_p(s) is below
0 and free, and ``V(s) = log pi_S(A_p(s)|s) - log pi_S(o|s)`` (o the outside argmax) is what the
loss sets. With the released expert term (``topp_mean``) the stationarity of J in a common shift c of
the Q's on A_p(s) reads, per visit of s as a state and per arrival at s as a successor,

    n_s  [ |A|/|V| (1 - (q - gamma V(s')) / (2 alpha)) - 1 ]  +  n'_s  gamma / (2 alpha) xbar_u  = 0,
    xbar_u = sum_{a in A_p(u)} Q(u, a) / |V| - gamma V(s)       (u: the predecessor state),

(n_s visits, n'_s arrivals; q the Q level on A_p(s)). At a state that is no successor (n'_s = 0: the
first response state) this is the own-state level ``q = gamma V(s') + 2 alpha (1 - |V| / |A_p(s)|)``,
far below 0 for ``|V| >> |A_p(s)|``: the set's logits go far below the outside maximum and the
student's mass leaves A_p(s). But one arrival weighs about ``|V| / |A|`` visits: the predecessor's
chi^2 (its mean of squares is dominated by the ``|V \\ A_p(u)|`` outside tokens' ``(gamma V(s))^2``)
pulls ``V(s)`` to about 0 with stiffness ``gamma^2 / (2 alpha)`` per arrival, so where ``n_s / n'_s``
is moderate ``V(s)`` settles near ``-(2 alpha / gamma^2) n_s / n'_s`` (about -0.2). There the mass on
A_p(s) is drawn to a level below ``e^V / (1 + e^V) < 1/2``: it falls from starts above that level and
rises from starts below it. (Measured on :func:`support_batch`, where the first state gets 32 visits
and 1 arrival: ``V = -1.80``, ``q = -2.90``, against ``q = -4.05`` with no arrival; at the other
argmax-outside states ``V`` lies in -0.09 .. -0.43 and the linear balance predicts it within 0.006.)
A teacher-like tabular start shows none of this.

    from tdrl.testing.support import check_keeps_support_network
    check_keeps_support_network("my-agent")   # AssertionError "my-agent: mass on A_p(s) ..." if it fails
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from tdrl.actions import in_set
from tdrl.agents.base import Agent
from tdrl.agents.registry import make_agent
from tdrl.models import Student
from tdrl.testing.agent_contract import _train, markov_batch, one_thread

__all__ = [
    "NetworkStudent",
    "StartStats",
    "network_start",
    "start_stats",
    "decoded_mass_in_set",
    "support_batch",
    "SupportRun",
    "network_support_run",
    "check_keeps_support_network",
]

#: width d of the network student's trunk (its LM head is ``[V, d]``)
HIDDEN = 16


class _Network(nn.Module):
    """Last-token embedding -> linear -> tanh (the trunk, ``[..., d]``), and one LM head ``W [V, d]``, ``b [V]``."""

    def __init__(self, vocab_size: int, hidden: int = HIDDEN):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=True)
        self.config = SimpleNamespace(vocab_size=vocab_size, hidden_size=hidden, n_embd=hidden)

    def trunk(self, input_ids: Tensor) -> Tensor:
        return torch.tanh(self.mix(self.embed(input_ids)))


class NetworkStudent(Student):
    """A small network as a student: the state is the last token, ``h(s) = tanh(M e_s + c)`` (``d = 16``),
    and ``logits(s) = W h(s) + b`` with ONE LM head ``W [V, d]``, ``b [V]`` shared by every state.

    Unlike :class:`~tdrl.testing.agent_contract.TabularStudent`, the logits of different states share
    parameters (the head, the mixing layer) and their scale: a loss that moves the logits at some
    states moves them elsewhere as well. ``hidden_states`` / ``output_weight`` / ``output_bias`` /
    ``full_logits`` are the trunk and the head, so every agent's maths (sparse gathers, the chunked
    full-vocabulary normaliser, value and Q heads of width ``hidden_size = d``, target copies) runs
    unchanged.
    """

    def __init__(self, vocab_size: int, tokenizer=None, *, hidden: int = HIDDEN, value_head: bool = False):
        super().__init__(_Network(vocab_size, hidden), tokenizer, value_head=value_head)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.trunk(input_ids)

    def output_weight(self) -> Tensor:
        return self.model.head.weight

    def output_bias(self) -> Tensor | None:
        return self.model.head.bias

    def full_logits(self, hidden: Tensor) -> Tensor:
        return self.model.head(hidden)


def support_batch():
    """The Markov problem of the support checks, ``(batch, teacher)``: 32 episodes of 6 tokens of the
    teacher's policy on A_p(s), V = 64 >> K = 8, p = 0.8 (the batch of the kit's ``support_run``)."""
    return markov_batch(vocab_size=64, top_k=8, scale=4.0, episodes=32, horizon=6)


def _transition_states(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per transition (row-major, as the agents flatten them): the state (last token), its A_p(s)
    (``cand_ids``, ``cand_mask``) and whether it is its response's first state."""
    sel = batch["response_mask"].bool()
    first = sel.clone()
    first[:, 1:] &= ~sel[:, :-1]
    return batch["input_ids"][sel], batch["cand_ids"][sel], batch["cand_mask"][sel].bool(), first[sel]


def _state_sets(batch: dict[str, Tensor]) -> dict[int, Tensor]:
    """A_p(s) of every state of the batch, transition and next states (a Markov teacher: one set per token)."""
    sel = batch["response_mask"].bool()
    need = sel.clone()
    need[:, 1:] |= sel[:, :-1]
    sets: dict[int, Tensor] = {}
    for token, cand, mask in zip(batch["input_ids"][need].tolist(), batch["cand_ids"][need], batch["cand_mask"][need]):
        sets.setdefault(token, cand[mask.bool()])
    return sets


def _pick_flagged(states: Tensor, order: list[int], first: list[int]) -> set[int]:
    """Distinct states, ``first`` then ``order``, added while the flagged share of the transition
    states stays at or below one half."""
    counts = torch.bincount(states, minlength=max(order + first) + 1).tolist()
    flagged, share, total = set(), 0, int(states.numel())
    for token in [*first, *(t for t in order if t not in first)]:
        if token not in flagged and 0 < counts[token] and share + counts[token] <= total // 2:
            flagged.add(token)
            share += counts[token]
    return flagged


@dataclass(frozen=True)
class StartStats:
    """How a start sits relative to the teacher's sets, per transition state of the batch (``[N]``).

    Attributes:
        mass_in_set: ``pi_S(A_p(s)|s)`` of the student's full-vocabulary softmax.
        mode_outside: the student's argmax over V lies outside A_p(s).
        flagged: the fit's target put its mode outside A_p(s) there.
        mode_outside_frac: the mean of ``mode_outside``.
        mean_mass_in_set: the mean of ``mass_in_set``.
    """

    mass_in_set: Tensor
    mode_outside: Tensor
    flagged: Tensor
    mode_outside_frac: float
    mean_mass_in_set: float


@torch.no_grad()
def start_stats(
    student: Student, batch: dict[str, Tensor], flagged: set[int] | frozenset[int] = frozenset()
) -> StartStats:
    """:class:`StartStats` of ``student`` on ``batch``, exact from the full logits (V is small)."""
    states, cand, mask, _ = _transition_states(batch)
    logits = student.full_logits(student.hidden_states(states)).float()
    mass = logits.log_softmax(-1).gather(-1, cand).masked_fill(~mask, float("-inf")).logsumexp(-1).exp()
    outside = ~in_set(cand, mask, logits.argmax(-1))
    flags = torch.tensor([s in flagged for s in states.tolist()], dtype=torch.bool)
    return StartStats(mass, outside, flags, float(outside.float().mean()), float(mass.mean()))


def network_start(
    teacher,
    batch: dict[str, Tensor],
    seed: int = 0,
    *,
    boost: float = 0.25,
    flag_first: bool = True,
    steps: int = 300,
    lr: float = 0.05,
) -> tuple[NetworkStudent, StartStats]:
    """A :class:`NetworkStudent` fitted to a start that follows the teacher on A_p(s) but, at about half
    of the data states, puts its most likely token outside A_p(s).

    The target at every state s of the batch is the teacher's ``pi_T(.|s)`` over V, except at the
    flagged states: there one token o outside A_p(s) (drawn by a generator seeded with ``seed``) gets
    the logit ``max_a log pi_T(a|s) + boost``, so it is the target's mode while the teacher's order on
    A_p(s) is kept (``boost = 0.25``: o is 1.28 times as likely as the teacher's best token, and the
    set keeps about half of the mass). The flagged states are the responses' first state (with
    ``flag_first``: the one state of an episode that is no successor of another) and then distinct
    states in the generator's random order, as long as they cover at most half of the transition
    states. The fit is full-batch Adam (``steps``, ``lr``, float32, seeded) on the cross-entropy from
    the target at the batch's distinct states; the student shares one LM head across them.

    Raises AssertionError unless the fraction of transition states whose student argmax lies outside
    A_p(s) is within [0.3, 0.7] and the mean mass on A_p(s) is at least 0.4.
    """
    generator = torch.Generator().manual_seed(seed)
    states, _, _, first = _transition_states(batch)
    sets = _state_sets(batch)
    distinct = torch.tensor(sorted(sets))
    order = distinct[torch.randperm(len(distinct), generator=generator)].tolist()
    flagged = _pick_flagged(states, order, sorted(set(states[first].tolist())) if flag_first else [])
    vocab = teacher.vocab_size
    target = teacher.logprobs[distinct].float().clone()  # [S, V]
    for row, token in enumerate(distinct.tolist()):
        if token in flagged:
            outside = torch.ones(vocab, dtype=torch.bool)
            outside[sets[token]] = False
            choices = torch.nonzero(outside).squeeze(-1)
            o = choices[torch.randint(len(choices), (1,), generator=generator)]
            target[row, o] = target[row].max() + boost
    target = target.log_softmax(-1).exp()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = NetworkStudent(vocab, teacher.tokenizer)
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(steps):
        log_p = student.full_logits(student.hidden_states(distinct)).log_softmax(-1)
        loss = -(target * log_p).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    stats = start_stats(student, batch, flagged)
    frac, mass = stats.mode_outside_frac, stats.mean_mass_in_set
    assert 0.3 <= frac <= 0.7, f"network start: the argmax lies outside A_p(s) at {frac:.2f} of the states"
    assert mass >= 0.4, f"network start: mean mass on A_p(s) {mass:.3f} < 0.4"
    return student, stats


@functools.lru_cache(maxsize=8)
def _fitted_start(seed: int, boost: float, flag_first: bool) -> tuple[dict[str, Tensor], StartStats]:
    batch, teacher = support_batch()
    student, stats = network_start(teacher, batch, seed, boost=boost, flag_first=flag_first)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, stats


@torch.no_grad()
def decoded_mass_in_set(agent: Agent, batch: dict[str, Tensor]) -> Tensor:
    """``pi_S(A_p(s)|s)`` per transition state ``[N]`` of the policy the agent decodes with (the softmax
    of :meth:`~tdrl.agents.base.Agent.policy_logits` over the whole vocabulary), exact from the full
    logits: the per-state form of ``1 - policy/outside_mass``."""
    states, cand, mask, _ = _transition_states(batch)
    logits = agent.policy_logits(agent.student.hidden_states(states)).float()
    return logits.log_softmax(-1).gather(-1, cand).masked_fill(~mask, float("-inf")).logsumexp(-1).exp()


@dataclass(frozen=True)
class SupportRun:
    """One :func:`network_support_run`, per transition state of the batch (``[N]``, row-major): the
    decoding policy's ``pi_S(A_p(s)|s)`` before and after training, whether the start's argmax lay
    outside A_p(s), the state (its last token) and whether it is its response's first state; and the
    trained agent.

    ``before`` / ``after`` are means over all states; ``*_outside`` / ``*_inside`` over the states
    whose start argmax lies outside / inside A_p(s).
    """

    name: str
    mass_before: Tensor
    mass_after: Tensor
    mode_outside: Tensor
    states: Tensor
    first: Tensor
    agent: Agent = field(repr=False, compare=False)

    @property
    def before(self) -> float:
        return float(self.mass_before.mean())

    @property
    def after(self) -> float:
        return float(self.mass_after.mean())

    @property
    def before_outside(self) -> float:
        return float(self.mass_before[self.mode_outside].mean())

    @property
    def after_outside(self) -> float:
        return float(self.mass_after[self.mode_outside].mean())

    @property
    def before_inside(self) -> float:
        return float(self.mass_before[~self.mode_outside].mean())

    @property
    def after_inside(self) -> float:
        return float(self.mass_after[~self.mode_outside].mean())

    def summary(self) -> str:
        return (
            f"mass on A_p(s) {self.before:.3f} -> {self.after:.3f} (argmax outside A_p(s) at the start: "
            f"{self.before_outside:.3f} -> {self.after_outside:.3f}; inside: {self.before_inside:.3f} -> "
            f"{self.after_inside:.3f})"
        )


def own_episodes(agent: Agent, teacher, *, top_k: int, top_p: float, horizon: int, episodes: int = 64):
    """For an on-policy agent (``agent.on_policy``), ``collect(step)`` for the kit's ``_train``:
    ``episodes`` fresh episodes sampled from the agent's behaviour (:meth:`~tdrl.agents.Agent.behaviour`)
    on the Markov teacher's env (seeded by the step); ``None`` for an offline agent, which trains on the
    given batch."""
    if not agent.on_policy:
        return None
    from tdrl.data import collate
    from tdrl.envs import StudentPolicy, TokenGenerationVectorEnv, rollout
    from tdrl.records import record_tensors

    env = TokenGenerationVectorEnv(teacher, [[0]], num_envs=8, top_k=top_k, top_p=top_p, max_new_tokens=horizon)

    def collect(step: int):  # sampled from the agent's behaviour (MiniLLM: its teacher mixture)
        records = rollout(env, StudentPolicy(agent, seed=step), episodes, seed=step)
        return collate([record_tensors(r) for r in records], teacher.pad_token_id)

    return collect


def network_support_run(
    name: str,
    steps: int = 300,
    lr: float = 0.01,
    *,
    seed: int = 0,
    boost: float = 0.25,
    flag_first: bool = True,
    **overrides,
) -> SupportRun:
    """Agent ``name`` (config ``overrides``) trains a :class:`NetworkStudent` from :func:`network_start`
    (argmax outside A_p(s) at about half of the data states; ``seed``, ``boost``, ``flag_first``) for
    ``steps`` Adam steps at ``lr`` (the kit's ``_train``; an on-policy agent on its own episodes, collected
    every 10 steps) on the Markov problem of
    :func:`support_batch` (V = 64 >> K = 8, p = 0.8). Returns the decoding policy's mass on A_p(s)
    per data state before and after, and where the start's argmax lay outside A_p(s)."""
    batch, teacher = support_batch()
    with one_thread():
        state, stats = _fitted_start(seed, boost, flag_first)
    student = NetworkStudent(teacher.vocab_size, teacher.tokenizer)
    student.load_state_dict(state)
    torch.manual_seed(seed)
    agent = make_agent(name, student, teacher=teacher, **overrides)
    before = decoded_mass_in_set(agent, batch)
    # an on-policy agent learns from its own episodes (as in the trainer), not from the teacher's batch
    _train(agent, batch, steps=steps, lr=lr, collect=own_episodes(agent, teacher, top_k=8, top_p=0.8, horizon=6))
    states, _, _, first = _transition_states(batch)
    return SupportRun(name, before, decoded_mass_in_set(agent, batch), stats.mode_outside, states, first, agent)


def check_keeps_support_network(name: str, margin: float = 0.05, **overrides) -> None:
    """The decoding student keeps its mass on A_p(s) from a network start whose argmax lies outside
    A_p(s) at about half of the states (:func:`network_support_run`): the mean of pi_S(A_p(s)|s) over
    the data states does not fall by more than ``margin``. BD's released objective (the max over V
    with chi^2) fails it; the same with the max over A_p(s) passes."""
    run = network_support_run(name, **overrides)
    assert run.after >= run.before - margin, f"{name}: {run.summary()}"
