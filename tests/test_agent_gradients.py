"""Gradients of the BD / IQ-Learn and Implicit Q-Learning losses against closed forms written by hand.

A tabular student (``logits(s) = W[:, s]``, s the last token) on a 3-state Markov problem: V = 5 tokens
(EOS = 4), states 0, 1, 2 and the teacher's sets A_p(s) at p = 0.9. Every expected gradient is built
here in float64 loops from the table and the hand-listed transitions, never from tdrl's loss code;
autograd's gradient of ``agent.loss`` must equal it entry by entry (float32 rounding: rel 1e-5), and
the entries the maths says are zero must be exactly 0.
"""

import math

import pytest
import torch

from tdrl.agents import make_agent
from tdrl.data import collate
from tdrl.testing import MarkovTeacher
from tdrl.testing.agent_contract import TabularStudent

V, EOS, TOP_P, SEED = 5, 4, 0.9, 19
#: A_p(s) of MarkovTeacher(vocab_size=5, seed=19) at p = 0.9 at the visited states (checked on the batch)
SETS = {0: (0, 1, 4), 1: (0, 2, 4), 2: (1, 2, 4)}
#: responses after the prompt [0]: two end with EOS (terminated); [0, 1, 0, 1] is cut at the length
#: limit (truncated: its last transition bootstraps gamma V(s_T), s_T = state 1); [2, 1, EOS] starts
#: with the data token 2, outside A_p(0)
EPISODES = ([1, 2, EOS], [0, 1, 0, 1], [2, 1, EOS])
#: the student's table W[a, s] (the logit of token a at state s), exact in float32. State 0: the max
#: (token 1) lies in A_p(0). State 1: the max over V (token 3, 2.5) lies OUTSIDE A_p(1) = {0, 2, 4}, the
#: max over A_p(1) is token 2. State 2: the max over V (token 0) lies outside A_p(2) = {1, 2, 4}, and
#: Q(2, 2) = -12 - max < q_min = -10 is clipped (for either max). Columns 3, 4: never a current state
#: (4 = EOS is s_T of the terminated responses: it must get no gradient).
TABLE = [
    # s=0   s=1    s=2    s=3   s=4
    [0.50, 0.75, 1.50, 0.25, 0.375],  # a=0
    [1.25, -0.50, 0.50, -0.125, -0.25],  # a=1
    [-0.75, 1.00, -12.0, 0.50, 0.125],  # a=2
    [-1.50, 2.50, -0.50, 0.0, 0.50],  # a=3
    [0.25, -0.25, 1.00, 0.375, -0.625],  # a=4
]
GAMMA, ALPHA, Q_MIN = 0.9, 0.25, -10.0
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------- the problem
def make_batch(teacher: MarkovTeacher):
    """The records of :data:`EPISODES` annotated by the teacher (K = V), collated: positions 0..n-1 of
    the annotated [0, *seq] are the response states, position n (the state after the last token) is
    ``final_*``."""
    records = []
    for seq in EPISODES:
        ann = teacher.annotate(torch.tensor([[0, *seq]]), top_k=V, top_p=TOP_P)
        sub, n = ann.subset[0], len(seq)
        records.append(
            {
                "prompt_ids": torch.tensor([0]),
                "response_ids": torch.tensor(seq),
                "cand_ids": sub.ids[:n],
                "cand_logprobs": sub.logprobs[:n],
                "cand_mask": sub.mask[:n],
                "action_logprob": ann.token_logprob[0],
                "reward": ann.reward[0],
                "terminated": seq[-1] == EOS,
                "final_cand_ids": sub.ids[n],
                "final_cand_logprobs": sub.logprobs[n],
                "final_cand_mask": sub.mask[n],
            }
        )
    return collate(records, teacher.pad_token_id)


def hand_transitions(teacher: MarkovTeacher):
    """(s, a, s', r) per response position, from :data:`EPISODES` alone: s' = a (the state is the last
    token), None where a is the EOS of a terminated response (V(s') = 0); for the truncated response
    the last s' is s_T. r = log pi_T(a|s) (the annotation's default reward)."""
    out = []
    for seq in EPISODES:
        for j, (s, a) in enumerate(zip([0, *seq[:-1]], seq)):
            terminal = j == len(seq) - 1 and a == EOS
            out.append((s, a, None if terminal else a, teacher.logprobs[s, a].item()))
    return out


@pytest.fixture(scope="module")
def problem():
    teacher = MarkovTeacher(vocab_size=V, seed=SEED)
    batch = make_batch(teacher)
    # the hand-listed sets are the teacher's (every visited state, and s_T of the truncated response)
    for b, seq in enumerate(EPISODES):
        for j, s in enumerate([0, *seq]):
            if j == len(seq) and seq[-1] == EOS:
                continue
            got = batch["cand_ids"][b, j][batch["cand_mask"][b, j]].tolist()
            assert sorted(got) == list(SETS[s]), (b, j, s, got)
    assert not bool(batch["terminated"][1]) and bool(batch["terminated"][0]) and bool(batch["terminated"][2])
    return teacher, batch


def tabular_student() -> TabularStudent:
    student = TabularStudent(V)
    with torch.no_grad():
        student.model.weight.copy_(torch.tensor(TABLE))
    return student


def table() -> torch.Tensor:
    return torch.tensor(TABLE, dtype=torch.float64)


# ---------------------------------------------------------------------- BD / IQ-Learn
def soft_q(z: torch.Tensor, s: int, max_over: str):
    """At state s with logits z (float64): the argmax m (over V or over A_p(s)), Q_b = max(z_b - z_m,
    q_min), the unclipped flags c_b, V(s) = lse_{A_p(s)} Q and the in-set softmax p_b = exp(Q_b - V)."""
    cols = list(SETS[s]) if max_over == "set" else list(range(V))
    m = max(cols, key=lambda b: z[b].item())
    q = [max(z[b].item() - z[m].item(), Q_MIN) for b in range(V)]
    c = [z[b].item() - z[m].item() > Q_MIN for b in range(V)]
    v = math.log(sum(math.exp(q[b]) for b in SETS[s]))
    p = {b: math.exp(q[b] - v) for b in SETS[s]}
    return m, q, c, v, p


def bd_gradient_by_hand(transitions, expert_term: str, chi2: bool, max_over: str, through_next: bool = True):
    """d loss / d W (``[V, V]``, float64) of BD / IQ-Learn.

    Derivation. Write G_i = gamma V(s'_i) (0 where s' is terminal), phi'(x) = 1 - x / (2 alpha) with
    chi^2 (phi(x) = x - x^2 / (4 alpha)), else 1. First the upstream gradients gQ[s][b] = d loss / d Q(s, b)
    and gV[s] = d loss / d V(s), summed over the transitions that use them:

    token:  loss = -(1/n) sum_{i in I} [phi(x_i) - (V(s_i) - G_i)], x_i = Q(s_i, a_i) - G_i, I the
            transitions with a_i in A_p(s_i), n = |I|:
            gQ[s_i][a_i] += -phi'(x_i) / n;  gV[s_i] += 1 / n;  gV[s'_i] += gamma (phi'(x_i) - 1) / n
            (d/dG_i = (phi'(x_i) - 1) / n).
    topp_mean: loss = -(1/N) sum_i [mean_V x_ib - (chi^2) mean_V x_ib^2 / (4 alpha) - (V(s_i) - G_i)],
            x_ib = 1[b in A_p(s_i)] Q(s_i, b) - G_i over every b of V, all N transitions:
            gQ[s_i][b] += -phi'(x_ib) / (V N) for b in A_p(s_i);  gV[s_i] += 1 / N;
            gV[s'_i] += gamma (mean_V phi'(x_ib) - 1) / N.
    Without chi^2 (phi' = 1) both gV[s'] terms vanish: the -gamma V(s') of the two terms telescope.

    Then per state, Q_b = max(z_b - z_m, q_min) and V(s) = lse_{b in A_p(s)} Q_b give, with
    p_b = exp(Q_b - V(s)), d_b = gQ[s][b] + gV[s] p_b for b in A_p(s), and c_b = 1[z_b - z_m > q_min]:

        d loss / d z_b = c_b d_b  (b != m),     d loss / d z_m = -sum_{b in A_p(s), b != m} c_b d_b,

    and 0 for every other token (outside A_p(s), not the argmax, or clipped). W[:, s] = z at state s.
    ``through_next=False`` leaves out the gV[s'] terms (what a stop-gradient on V(s') would give)."""
    w = table()
    facts = {s: soft_q(w[:, s], s, max_over) for s in SETS}
    g_q = {s: [0.0] * V for s in SETS}
    g_v = dict.fromkeys(SETS, 0.0)

    def dphi(x):
        return 1.0 - x / (2 * ALPHA) if chi2 else 1.0

    used = [t for t in transitions if expert_term == "topp_mean" or t[1] in SETS[t[0]]]
    n = len(used)
    for s, a, nxt, _ in used:
        g = 0.0 if nxt is None else GAMMA * facts[nxt][3]
        q = facts[s][1]
        if expert_term == "token":
            d_next = dphi(q[a] - g) - 1.0
            g_q[s][a] += -dphi(q[a] - g) / n
        else:
            xs = [(q[b] if b in SETS[s] else 0.0) - g for b in range(V)]
            d_next = sum(dphi(x) for x in xs) / V - 1.0
            for b in SETS[s]:
                g_q[s][b] += -dphi(xs[b]) / (V * n)
        g_v[s] += 1.0 / n
        if nxt is not None and through_next:
            g_v[nxt] += GAMMA * d_next / n
    grad = torch.zeros(V, V, dtype=torch.float64)
    for s in SETS:
        m, _, c, _, p = facts[s]
        for b in SETS[s]:
            if b != m and c[b]:
                d = g_q[s][b] + g_v[s] * p[b]
                grad[b, s] += d
                grad[m, s] -= d
    return grad


def bd_autograd(name: str, batch, **settings) -> torch.Tensor:
    student = tabular_student()
    agent = make_agent(name, student, gamma=GAMMA, alpha=ALPHA, q_min=Q_MIN, top_p=None, **settings)
    loss, _ = agent.loss(agent.transitions(batch), batch)
    loss.backward()
    return student.model.weight.grad.double()


@pytest.mark.parametrize("max_over", ["vocab", "set"])
@pytest.mark.parametrize("chi2", [True, False])
@pytest.mark.parametrize("expert_term", ["token", "topp_mean"])
@pytest.mark.parametrize("name", ["bd", "iqlearn"])
def test_bd_gradient_by_hand(problem, name, expert_term, chi2, max_over):
    """autograd d loss / d W of bd / iqlearn = :func:`bd_gradient_by_hand` (its docstring derives it),
    for both expert terms, chi^2 on and off, the max over V and over A_p(s). Then the cases one by one:

    * outside A_p(s): every logit that is neither in A_p(s) nor the argmax has gradient exactly 0;
    * max over V at states 1 and 2, argmax outside A_p(s): d/dz_m = -sum of the in-set gradients
      (Q_b = z_b - z_m for every unclipped b; the clipped one adds 0);
    * the clipped Q(2, 2) has gradient exactly 0; so has every logit of the never-visited state 3 and
      of the EOS state 4, the s' of the terminated responses (V(s') = 0 there);
    * the gradient through V(s') shows up (the multi-step episodes and the truncated one's V(s_T)):
      leaving out the gV[s'] terms changes the expected gradient with chi^2; without it they cancel
      exactly (phi' = 1: the -gamma V(s') of the expert and value terms telescope), in both forms."""
    _, batch = problem
    got = bd_autograd(name, batch, expert_term=expert_term, chi2=chi2, max_over=max_over)
    transitions = hand_transitions(problem[0])
    expected = bd_gradient_by_hand(transitions, expert_term, chi2, max_over)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)

    w = table()
    for s in SETS:
        m = soft_q(w[:, s], s, max_over)[0]
        for b in range(V):
            if b not in SETS[s] and b != m:
                assert got[b, s] == 0, (s, b, got[b, s])
        if max_over == "vocab" and s in (1, 2):
            assert m not in SETS[s]
            assert got[m, s].item() == pytest.approx(-got[list(SETS[s]), s].sum().item(), rel=RTOL, abs=ATOL)
            assert got[m, s] != 0
    assert got[2, 2] == 0  # clipped: z - max = -12 - 1.5 (or - 1.0) < q_min
    assert (got[:, 3] == 0).all() and (got[:, 4] == 0).all()  # never a state / terminal s' of the EOS
    assert (got[list(SETS[1]), 1] != 0).any()  # state 1 is also the truncated response's s_T
    without_next = bd_gradient_by_hand(transitions, expert_term, chi2, max_over, through_next=False)
    gap = (expected - without_next).abs().max().item()
    if not chi2:
        assert gap == 0.0
    else:
        assert gap > 1e-2, gap


def test_bd_truncated_response_bootstraps_v_of_s_T(problem):
    """The truncated response [0, 1, 0, 1] ends at s_T = state 1: its last transition (0 -> 1) backs up
    gamma V(1) on the final set A_p(1), so the hand gradient with that V(s_T) term left out (as if the
    response had terminated) differs from autograd's, and the one with it equals it."""
    teacher, batch = problem
    got = bd_autograd("bd", batch, expert_term="topp_mean", chi2=True, max_over="vocab")
    transitions = hand_transitions(teacher)
    assert transitions[6] == (0, 1, 1, pytest.approx(teacher.logprobs[0, 1].item()))  # the truncated response's last
    as_if_terminated = [t if i != 6 else (*t[:2], None, t[3]) for i, t in enumerate(transitions)]
    wrong = bd_gradient_by_hand(as_if_terminated, "topp_mean", True, "vocab")
    right = bd_gradient_by_hand(transitions, "topp_mean", True, "vocab")
    torch.testing.assert_close(got, right, rtol=RTOL, atol=ATOL)
    assert (got - wrong).abs().max().item() > 1e-2


# ---------------------------------------------------------------------- Implicit Q-Learning
TAU, BETA, CAP = 0.7, 3.0, 4.0


def iql_agent(restrict: str):
    student = tabular_student()
    agent = make_agent(
        "iql", student, gamma=GAMMA, expectile=TAU, beta=BETA, max_weight=CAP, top_p=None, restrict=restrict
    )
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        agent.q_head.weight.copy_(torch.randn(V, V, generator=gen))
        agent.q_head.bias.copy_(torch.randn(V, generator=gen))
        agent.target_q_head.weight.copy_(torch.randn(V, V, generator=gen))
        agent.target_q_head.bias.copy_(torch.randn(V, generator=gen))
        student.value_head.weight.copy_(torch.randn(1, V, generator=gen))
        student.value_head.bias.fill_(0.25)
    return agent


def iql_gradient_by_hand(agent, transitions, restrict: str, leak: str | None = None):
    """d loss / d (LM head W, value head (w_v, b_v), Q head (W_q, b_q)), float64, of Implicit Q-Learning.

    Derivation. One-hot states: Q(s, a) = W_q[a, s] + b_q[a], Q'(s, a) = W_t[a, s] + b_t[a] (target,
    frozen), V(s) = w_v[s] + b_v, log pi(a|s) = z_a - lse_V z (z = W[:, s]; over A_p(s) for
    restrict="set"). D = the transitions whose data token lies in A_p(s) (all of them for "none"),
    n = |D|; u_i = Q'(s_i, a_i) - V(s_i), e_i = tau if u_i >= 0 else 1 - tau, y_i = r_i + gamma V(s'_i)
    (0 at a terminal s'), omega_i = min(exp(beta u_i), cap):

        L_V = (1/n) sum e_i u_i^2          -> dL/dV(s_i) = -2 e_i u_i / n (into w_v[s_i] and b_v)
        L_Q = (1/n) sum 1/2 (Q_i - y_i)^2  -> dL/dQ_i = (Q_i - y_i) / n (into W_q[a_i, s_i] and b_q[a_i]);
                                              y_i is detached: nothing into V(s'_i)
        L_pi = -(1/n) sum omega_i log pi(a_i|s_i)
                                           -> dL/dz_j(s_i) = -omega_i (1[j = a_i] - pi(j|s_i)) / n;
                                              omega_i is detached: nothing into V(s_i) or Q'

    The transitions outside D contribute nothing anywhere. ``leak`` adds what dropping a stop-gradient
    would: ``"next"`` the L_Q gradient into V(s'_i) (-gamma (Q_i - y_i) / n), ``"adv"`` the L_pi one into
    V(s_i) (beta omega_i log pi(a_i|s_i) / n where omega_i < cap)."""
    w = table()
    qw, qb = agent.q_head.weight.detach().double(), agent.q_head.bias.detach().double()
    tw, tb = agent.target_q_head.weight.detach().double(), agent.target_q_head.bias.detach().double()
    vw, vb = agent.student.value_head.weight.detach().double()[0], agent.student.value_head.bias.item()
    d_w, d_qw, d_qb = torch.zeros(V, V, dtype=torch.float64), torch.zeros(V, V, dtype=torch.float64), [0.0] * V
    d_vw, d_vb = [0.0] * V, 0.0
    used = [t for t in transitions if restrict == "none" or t[1] in SETS[t[0]]]
    n = len(used)
    for s, a, nxt, r in used:
        q, q_target, v = (qw[a, s] + qb[a]).item(), (tw[a, s] + tb[a]).item(), (vw[s] + vb).item()
        y = r + (0.0 if nxt is None else GAMMA * (vw[nxt] + vb).item())
        u = q_target - v
        e = TAU if u >= 0 else 1 - TAU
        d_vw[s] += -2 * e * u / n
        d_vb += -2 * e * u / n
        d_qw[a, s] += (q - y) / n
        d_qb[a] += (q - y) / n
        omega = min(math.exp(BETA * u), CAP)
        support = list(SETS[s]) if restrict == "set" else list(range(V))
        log_z = math.log(sum(math.exp(w[j, s].item()) for j in support))
        for j in support:
            d_w[j, s] += -omega * ((j == a) - math.exp(w[j, s].item() - log_z)) / n
        if leak == "next" and nxt is not None:
            d_vw[nxt] += -GAMMA * (q - y) / n
            d_vb += -GAMMA * (q - y) / n
        if leak == "adv" and omega < CAP:
            d_vw[s] += BETA * omega * (w[a, s].item() - log_z) / n
            d_vb += BETA * omega * (w[a, s].item() - log_z) / n
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {"W": d_w, "vw": as_t(d_vw), "vb": as_t(d_vb), "qw": d_qw, "qb": as_t(d_qb)}


def iql_autograd(agent, batch):
    loss, _ = agent.loss(agent.transitions(batch), batch)
    loss.backward()
    student = agent.student
    got = {
        "W": student.model.weight.grad,
        "vw": student.value_head.weight.grad[0],
        "vb": student.value_head.bias.grad[0],
        "qw": agent.q_head.weight.grad,
        "qb": agent.q_head.bias.grad,
    }
    return {k: g.double() for k, g in got.items()}


@pytest.mark.parametrize("restrict", ["mdp", "set", "none"])
def test_iql_gradient_by_hand(problem, restrict):
    """autograd's gradients of Implicit Q-Learning = :func:`iql_gradient_by_hand` (derived there), for
    the LM head (the table W), the value head (only L_V reaches it: not L_Q through V(s'), not L_pi
    through the weights) and the Q head (only L_Q); the target head gets no gradient. The hand-set
    heads hit u >= 0 and u < 0 and the weight cap; the value-head gradient differs from what a dropped
    stop-gradient on V(s') or on the advantage would give. The data token 2 outside A_p(0) (transition
    0 -> 2) is left out of every term by default ("mdp", "set"): W_q[2, 0] gets exactly 0, and moving
    Q'(0, 2) or Q(0, 2) changes no gradient; with "none" it is used."""
    teacher, batch = problem
    transitions = hand_transitions(teacher)
    agent = iql_agent(restrict)
    got = iql_autograd(agent, batch)
    expected = iql_gradient_by_hand(agent, transitions, restrict)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
    assert all(p.grad is None for p in agent.target_q_head.parameters())

    # the cases the heads were set to hit (u on both sides of 0, the cap), among the used transitions
    tw, tb = agent.target_q_head.weight.detach().double(), agent.target_q_head.bias.detach().double()
    vw, vb = agent.student.value_head.weight.detach().double()[0], agent.student.value_head.bias.item()
    us = [(tw[a, s] + tb[a]).item() - (vw[s] + vb).item() for s, a, _, _ in transitions if a in SETS[s]]
    assert min(us) < 0 < max(us) and max(math.exp(BETA * u) for u in us) > CAP > min(math.exp(BETA * u) for u in us)
    for leak in ("next", "adv"):
        leaked = iql_gradient_by_hand(agent, transitions, restrict, leak=leak)
        assert (leaked["vw"] - expected["vw"]).abs().max() > 1e-3, leak

    outside = (0, 2)
    assert outside[1] not in SETS[outside[0]]
    if restrict == "none":
        assert got["qw"][2, 0] != 0
        return
    assert got["qw"][2, 0] == 0
    for head in (agent.target_q_head, agent.q_head):
        moved = iql_agent(restrict)
        with torch.no_grad():
            getattr(moved, "target_q_head" if head is agent.target_q_head else "q_head").weight[2, 0] += 3.0
        again = iql_autograd(moved, batch)
        for key in got:
            assert torch.equal(again[key], got[key]), key
