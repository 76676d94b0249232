"""Agents: the conformance kit for every agent, and exact checks against brute force."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tdrl.agents import expectile_loss, get_agent, list_agents, make_agent, masked_logsumexp
from tdrl.errors import ConfigError
from tdrl.testing import MarkovTeacher
from tdrl.testing.agent_contract import CHECKS, TabularStudent, contract_batch, run_agent_contract

BUILT_IN = ["bc", "sql", "cql", "iql", "iqlearn", "bd"]
VARIANTS = [
    ("bc", {"mode": "sft"}),
    ("bc", {"restrict": "none"}),
    ("sql", {"target": "none", "alpha": 0.5}),
    ("cql", {"restrict": "none"}),
    ("iql", {"restrict": "none"}),
    ("iqlearn", {"expert_term": "topp_mean"}),
    ("iqlearn", {"chi2": False, "restrict": "none"}),
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", BUILT_IN)
def test_agent_contract(name, check):
    check(name)


@pytest.mark.parametrize("name, overrides", VARIANTS, ids=lambda v: str(v))
def test_agent_contract_variants(name, overrides):
    run_agent_contract(name, **overrides)


def load_example_plugin():
    path = Path(__file__).resolve().parents[1] / "examples" / "reverse_kl_agent.py"
    spec = importlib.util.spec_from_file_location("reverse_kl_agent", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reverse_kl_agent"] = module
    spec.loader.exec_module(module)
    return module


def test_example_plugin_passes_the_kit():
    load_example_plugin()
    assert "reverse-kl" in list_agents()
    run_agent_contract("reverse-kl")


def test_registry_errors():
    assert set(BUILT_IN) <= set(list_agents())
    with pytest.raises(ConfigError, match="unknown agent 'ppo'.*bc"):
        get_agent("ppo")
    with pytest.raises(ConfigError, match="no setting"):
        make_agent("sql", TabularStudent(4), temperature=2.0)
    with pytest.raises(ConfigError, match="restrict"):
        make_agent("bc", TabularStudent(4), restrict="sometimes")
    with pytest.raises(ConfigError, match="top_p"):
        make_agent("bd", TabularStudent(4), top_p=1.5)


# ---------------------------------------------------------------------- brute force on a Markov teacher
GAMMA = 0.9


def top_p_sets(probs: np.ndarray, p: float) -> list[list[int]]:
    sets = []
    for row in probs:
        order = np.argsort(-row, kind="stable")
        chosen, mass = [], 0.0
        for a in order:
            if mass >= p:
                break
            chosen.append(int(a))
            mass += row[a]
        sets.append(chosen)
    return sets


def soft_value_iteration(logprobs: np.ndarray, sets, eos: int, gamma=GAMMA, iters=2000) -> np.ndarray:
    """Q*_p of the top-p soft Bellman optimality operator, reward log pi_T; nan outside A_p."""
    v_size = logprobs.shape[0]
    q = np.zeros((v_size, v_size))
    for _ in range(iters):
        v = np.array([np.log(np.exp(q[s, sets[s]]).sum()) for s in range(v_size)])
        v[eos] = 0.0
        q = logprobs + gamma * np.where(np.arange(v_size) == eos, 0.0, v)[None, :]
    out = np.full_like(q, np.nan)
    for s in range(v_size):
        out[s, sets[s]] = q[s, sets[s]]
    return out


def projected_teacher_q(logprobs: np.ndarray, sets, eos: int, gamma=GAMMA, iters=2000) -> np.ndarray:
    """Soft Q of the projected teacher proj_p(pi_T) on M_p (evaluation form)."""
    v_size = logprobs.shape[0]
    probs = np.exp(logprobs)
    proj = np.zeros_like(probs)
    for s in range(v_size):
        proj[s, sets[s]] = probs[s, sets[s]] / probs[s, sets[s]].sum()
    q = np.zeros((v_size, v_size))
    for _ in range(iters):
        v = np.array([sum(proj[s, a] * (q[s, a] - np.log(proj[s, a])) for a in sets[s]) for s in range(v_size)])
        v[eos] = 0.0
        q = logprobs + gamma * np.where(np.arange(v_size) == eos, 0.0, v)[None, :]
    return q


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_top_p_value_iteration_bounds(p):
    teacher = MarkovTeacher(vocab_size=6, seed=1, eos_bias=-1.0)
    logprobs = teacher.logprobs.numpy()
    eos = teacher.eos_token_id
    probs = np.exp(logprobs)
    q_star = soft_value_iteration(logprobs, [list(range(6))] * 6, eos)
    assert np.allclose(q_star, logprobs, atol=1e-9)  # p = 1: Q* = log pi_T (V* = 0)
    sets = top_p_sets(probs, p)
    q_p = soft_value_iteration(logprobs, sets, eos)
    q_proj = projected_teacher_q(logprobs, sets, eos)
    kappa = -(GAMMA / (1 - GAMMA)) * math.log(p)
    for s in range(6):
        if s == eos:
            continue
        a = sets[s]
        gap = q_star[s, a] - q_p[s, a]
        assert (gap >= -1e-9).all() and (gap <= kappa + 1e-9).all(), (s, gap, kappa)
        assert (q_proj[s, a] <= q_p[s, a] + 1e-9).all()  # Q^{proj teacher}_p <= Q*_p <= Q*
    assert np.nanmax(q_star - q_p) > 1e-4 or p > 0.9  # the bound is not vacuous: there is a gap


def tabular_transition_batch(teacher: MarkovTeacher, sets):
    """Every (s, a in A_p(s)) pair of a Markov teacher as a one-step transition batch."""
    eos, v_size = teacher.eos_token_id, teacher.vocab_size
    logprobs = teacher.logprobs.float()
    pairs = [(s, a) for s in range(v_size) if s != eos for a in sets[s]]
    n = len(pairs)
    batch = {
        "input_ids": torch.tensor(pairs),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "response_mask": torch.tensor([[True, False]] * n),
        "cand_ids": torch.zeros(n, 2, v_size, dtype=torch.long),
        "cand_mask": torch.zeros(n, 2, v_size, dtype=torch.bool),
        "cand_logprobs": torch.full((n, 2, v_size), float("-inf")),
        "action_logprob": torch.zeros(n, 2),
        "action_in_cand": torch.tensor([[True, False]] * n),
        "reward": torch.zeros(n, 2),
        "done": torch.zeros(n, 2, dtype=torch.bool),
    }
    for i, (s, a) in enumerate(pairs):
        for pos, state in ((0, s), (1, a)):
            if state == eos:
                continue
            k = len(sets[state])
            batch["cand_ids"][i, pos, :k] = torch.tensor(sets[state])
            batch["cand_mask"][i, pos, :k] = True
            batch["cand_logprobs"][i, pos, :k] = logprobs[state, sets[state]]
        batch["reward"][i, 0] = logprobs[s, a]
        batch["action_logprob"][i, 0] = logprobs[s, a]
        batch["done"][i, 0] = a == eos
    return batch, pairs


@pytest.mark.parametrize("target", ["none", "polyak"])
def test_sql_tabular_converges_to_q_star_p(target):
    teacher = MarkovTeacher(vocab_size=5, seed=3, eos_bias=-1.0)
    logprobs = teacher.logprobs.numpy()
    sets = top_p_sets(np.exp(logprobs), 0.8)
    q_p = soft_value_iteration(logprobs, sets, teacher.eos_token_id)
    batch, pairs = tabular_transition_batch(teacher, sets)
    torch.manual_seed(0)
    agent = make_agent("sql", TabularStudent(5), gamma=GAMMA, target=target, tau=0.1)
    optimiser = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=0.05)
    for _ in range(1500):
        loss, metrics = agent.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        agent.after_update()
    table = agent.student.model.weight.detach().double()  # Q(s, a) = W[a, s]
    learned = np.array([table[a, s].item() for s, a in pairs])
    expected = np.array([q_p[s, a] for s, a in pairs])
    assert np.abs(learned - expected).max() < 1e-2, np.abs(learned - expected).max()
    assert metrics["td/abs_error"] < 1e-2


def test_soft_bellman_target_by_hand():
    """One SQL loss on a hand-built transition equals 1/2 (Q(s,a) - r - gamma alpha lse(Q(s',.)/alpha))^2."""
    teacher = MarkovTeacher(vocab_size=4, seed=0)
    sets = [[0, 1], [1, 2], [2, 0], []]
    batch, pairs = tabular_transition_batch(teacher, sets)
    student = TabularStudent(4)
    with torch.no_grad():
        student.model.weight.copy_(torch.arange(16.0).reshape(4, 4) / 7.0)
    agent = make_agent("sql", student, gamma=0.5, alpha=2.0, target="none")
    loss, _ = agent.loss(batch)
    w = student.model.weight.detach().double()
    terms = []
    for s, a in pairs:
        r = teacher.logprobs[s, a].item()
        v_next = 0.0 if a == 3 else 2.0 * math.log(sum(math.exp(w[b, a].item() / 2.0) for b in sets[a]))
        terms.append(0.5 * (w[a, s].item() - r - 0.5 * v_next) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_cql_gap_by_hand():
    teacher = MarkovTeacher(vocab_size=4, seed=0)
    sets = [[0, 1, 2], [1, 2], [2, 0], []]
    batch, pairs = tabular_transition_batch(teacher, sets)
    student = TabularStudent(4)
    with torch.no_grad():
        student.model.weight.copy_(
            torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.5, 0.0, -0.5, 0.0], [-2.0, 1.0, 0.25, 0.0], [0.0, 3.0, 1.0, 0.0]])
        )
    agent = make_agent("cql", student, target="none", cql_alpha=0.7)
    loss, metrics = agent.loss(batch)
    w = student.model.weight.detach().double()
    gaps = [math.log(sum(math.exp(w[b, s].item()) for b in sets[s])) - w[a, s].item() for s, a in pairs]
    assert metrics["cql/gap"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-6)
    assert loss.item() == pytest.approx(metrics["loss/td"] + 0.7 * metrics["cql/gap"], rel=1e-6)


def test_expectile_loss_by_hand():
    u = torch.tensor([-2.0, 1.0, 0.5])
    # weights |0.7 - 1(u < 0)| = 0.3, 0.7, 0.7
    assert expectile_loss(u, 0.7).item() == pytest.approx((0.3 * 4 + 0.7 * 1 + 0.7 * 0.25) / 3)
    assert expectile_loss(u, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 0.25) / 3)


def test_masked_logsumexp_by_hand_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_logsumexp(x, mask)
    assert out[0].item() == pytest.approx(math.log(math.e + math.e**3))
    assert out[1].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().sum() == 0


def test_iqlearn_without_chi2_is_top_p_behaviour_cloning():
    from tdrl.students import load_student

    batch = contract_batch()
    torch.manual_seed(0)
    student = load_student("tiny")
    agent = make_agent("iqlearn", student, chi2=False)
    loss, metrics = agent.loss(batch)
    # independent computation of E[log proj_p softmax(Q)(a|s)] with Q = logits - max, clipped at -10
    hidden = student.hidden_states(batch["input_ids"], batch["attention_mask"])
    logits = student.full_logits(hidden).double()
    terms = []
    for b, t in torch.nonzero(batch["response_mask"]).tolist():
        cand = batch["cand_ids"][b, t][batch["cand_mask"][b, t]].tolist()
        action = batch["input_ids"][b, t + 1].item()
        if action not in cand:
            continue
        q = logits[b, t, cand]
        q = (q - q.max()).clamp(min=-10.0)
        terms.append((q[cand.index(action)] - torch.logsumexp(q, 0)).item())
    assert metrics["data/off_support_frac"] > 0  # the batch has an excluded transition
    assert -loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_iql_with_beta_zero_is_sft():
    from tdrl.students import load_student

    batch = contract_batch()
    torch.manual_seed(0)
    student = load_student("tiny")
    _, iql_metrics = make_agent("iql", student, beta=0.0).loss(batch)
    sft_loss, _ = make_agent("bc", student, mode="sft").loss(batch)
    assert iql_metrics["loss/policy"] == pytest.approx(sft_loss.item(), rel=1e-6)
    assert iql_metrics["adv/weight_mean"] == pytest.approx(1.0)


def test_gkd_like_kd_equals_cross_entropy_by_hand():
    """bc kd: - sum_{A_p} pi_T^p log pi_S^p, computed independently from full logits."""
    from tdrl.students import load_student

    batch = contract_batch()
    torch.manual_seed(0)
    student = load_student("tiny")
    loss, _ = make_agent("bc", student, mode="kd").loss(batch)
    logits = student.full_logits(student.hidden_states(batch["input_ids"], batch["attention_mask"])).double()
    terms = []
    for b, t in torch.nonzero(batch["response_mask"]).tolist():
        m = batch["cand_mask"][b, t]
        cand = batch["cand_ids"][b, t][m]
        teacher = torch.softmax(batch["cand_logprobs"][b, t][m].double(), 0)
        student_lp = torch.log_softmax(logits[b, t, cand], 0)
        terms.append(-(teacher * student_lp).sum().item())
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_kd_online_is_the_full_vocabulary_forward_kl_by_hand(tiny_teacher):
    """kd-online: sum_V pi_T (log pi_T - log pi_S) at every response position, from the two HF models'
    own forward passes, position by position; no teacher attached -> a clear error."""
    from tdrl.students import load_student

    batch = contract_batch()
    torch.manual_seed(0)
    student = load_student("tiny")
    agent = make_agent("kd-online", student)
    with pytest.raises(ConfigError, match="attach_teacher"):
        agent.loss(batch)
    agent.attach_teacher(tiny_teacher)
    loss, metrics = agent.loss(batch)
    loss.backward()
    assert student.model.get_input_embeddings().weight.grad.abs().sum() > 0
    terms, nll = [], []
    with torch.no_grad():
        for b, t in torch.nonzero(batch["response_mask"]).tolist():
            ids = batch["input_ids"][b : b + 1, : t + 1]
            pt = torch.log_softmax(tiny_teacher.model(input_ids=ids).logits[0, -1].double(), 0)
            ps = torch.log_softmax(student.model(input_ids=ids).logits[0, -1].double(), 0)
            terms.append((pt.exp() * (pt - ps)).sum().item())
            nll.append(-ps[batch["input_ids"][b, t + 1]].item())
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert metrics["policy/nll_data"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert "kd-online" in list_agents() and "teacher" not in " ".join(agent.state_dict())


def _outside_exact(student, t):
    """-log pi_S(A_p(s)|s) per transition state from the full-vocabulary softmax."""
    logp = torch.log_softmax(student.full_logits(t.hidden[t.cur]).double(), -1)
    ids, mask = t.cand_ids[t.cur], t.cand_mask[t.cur]
    for row, m in zip(ids, mask):  # candidate ids are distinct within a row: each counted once
        assert len(set(row[m].tolist())) == int(m.sum())
    return -logp.gather(-1, ids).masked_fill(~mask, float("-inf")).logsumexp(-1)


def test_outside_mass_term_is_exact_when_it_can_enumerate_and_unbiased_when_it_samples():
    from tdrl.students import load_student

    batch = contract_batch()
    torch.manual_seed(0)
    student = load_student("tiny")
    agent = make_agent("bd", student, outside_samples=4096)  # more than V: every outside id, exactly
    t = agent.transitions(batch)
    gap, mass = agent.outside_loss(t)
    exact = _outside_exact(student, t)
    assert gap.item() == pytest.approx(exact.mean().item(), rel=1e-4)
    assert mass.item() == pytest.approx((1 - torch.exp(-exact)).mean().item(), rel=1e-4)
    # sampling 8 of the ~500 other ids: exp(gap) - 1 = Z_out / Z_A is unbiased, state by state
    one = dataclasses.replace(t, cur=t.cur[:1])
    target = math.expm1(_outside_exact(student, one).item())
    sampler = make_agent("bd", student, outside_samples=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = np.array([math.expm1(sampler.outside_loss(one, generator=gen)[0].item()) for _ in range(3000)])
    assert abs(draws.mean() - target) < 3 * draws.std() / math.sqrt(len(draws))
    assert draws.std() > 0  # it did sample


def test_forward_adds_the_outside_term_only_on_the_top_p_path():
    from tdrl.students import load_student

    batch = contract_batch()
    torch.manual_seed(0)
    student = load_student("tiny")
    agent = make_agent("bc", student, outside_coef=0.5, outside_samples=4096)
    loss, _ = agent.loss(batch)
    total, metrics = agent(batch)
    assert total.item() == pytest.approx(loss.item() + 0.5 * metrics["loss/outside"], rel=1e-6)
    assert 0 < metrics["policy/outside_mass"] < 1
    full = make_agent("bc", student, restrict="none")
    total, metrics = full(batch)
    assert "loss/outside" not in metrics and total.item() == pytest.approx(full.loss(batch)[0].item())
    with pytest.raises(ConfigError, match="outside_coef"):
        make_agent("bd", student, outside_coef=-1)
