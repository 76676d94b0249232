"""On-policy agents: MiniLLM's gradient against the exact sequence-level reverse KL, GKD against KD."""

import itertools
import math

import numpy as np
import pytest
import torch

from tdrl.agents import make_agent
from tdrl.cli import main
from tdrl.data import collate
from tdrl.envs import StudentPolicy, TokenGenerationVectorEnv, rollout
from tdrl.records import annotated_record, record_tensors
from tdrl.testing import MarkovTeacher
from tdrl.testing.agent_contract import CHECKS, TabularStudent


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["gkd", "minillm"])
def test_contract(name, check):
    check(name)


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
@pytest.mark.parametrize("restrict", ["mdp", "none", "set"])
def test_gkd_variants_pass_the_kit(divergence, restrict):
    for check in CHECKS:
        check("gkd", divergence=divergence, restrict=restrict)


def partition_by_hand(batch, logits, teacher_logits, b, t, temperature=1.0):
    """Teacher and student over {A_p(s)} + {outside} at one position, each coarsened from its own full
    distribution over V (the student's logits, the teacher's own forward pass: not the cache). At a
    temperature other than 1 the cache cannot know the teacher's tail; the agent spreads it evenly
    over the outside tokens (documented in ``partition_log_probs``), and so does this reference."""
    m = batch["cand_mask"][b, t]
    cand = batch["cand_ids"][b, t][m]
    logp_s = torch.log_softmax(logits[b, t] / temperature, 0)
    student = torch.cat([logp_s[cand], torch.log1p(-logp_s[cand].exp().sum()).reshape(1)])
    logp_t = torch.log_softmax(teacher_logits[b, t], 0)
    vocab, n_out = logits.shape[-1], logits.shape[-1] - len(cand)
    assert vocab > len(cand)
    if temperature == 1.0:
        return torch.cat([logp_t[cand], torch.log1p(-logp_t[cand].exp().sum()).reshape(1)]), student
    rest = 1 - logp_t[cand].exp().sum()
    tail = math.log(n_out) + (torch.log(rest) - math.log(n_out)) / temperature
    return torch.log_softmax(torch.cat([logp_t[cand] / temperature, tail.reshape(1)]), 0), student


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gkd_divergences_by_hand(temperature, tiny_teacher):
    """Forward KL, reverse KL and the generalised JSD (beta 0.3) between the full-vocabulary teacher
    and student coarsened to A_p(s) + one outside bucket, at a temperature dividing both; at
    temperature 1 the teacher's bucket is exactly 1 - pi_T(A_p(s))."""
    from tdrl.envs import TeacherPolicy, TokenGenerationEnv
    from tdrl.models import load_student

    env = TokenGenerationEnv(
        tiny_teacher, ["Name three colors.", "hi", "Define gravity."], top_k=16, top_p=0.8, max_new_tokens=6
    )
    records = rollout(env, TeacherPolicy(seed=0, temperature=1.5), 4, seed=0)
    batch = collate([record_tensors(r) for r in records], tiny_teacher.pad_token_id)
    torch.manual_seed(0)
    student = load_student("tiny")
    logits = student.full_logits(student.hidden_states(batch["input_ids"], batch["attention_mask"])).double()
    with torch.no_grad():
        teacher_logits = tiny_teacher.logits(batch["input_ids"], batch["attention_mask"]).double()
    results = {}
    for divergence in ("forward", "reverse", "jsd"):
        agent = make_agent("gkd", student, divergence=divergence, beta=0.3, temperature=temperature)
        results[divergence], _ = agent(batch)
    fwd, rev, jsd = [], [], []
    for b, t in torch.nonzero(batch["response_mask"]).tolist():
        lt, ls = partition_by_hand(batch, logits, teacher_logits, b, t, temperature)
        pt, ps = lt.exp(), ls.exp()
        lm = torch.log(0.3 * pt + 0.7 * ps)
        fwd.append((pt * (lt - ls)).sum().item())
        rev.append((ps * (ls - lt)).sum().item())
        jsd.append((0.3 * pt * (lt - lm) + 0.7 * ps * (ls - lm)).sum().item())
        if temperature == 1.0:
            assert pt[-1].item() == pytest.approx(  # the teacher's own tail = 1 - the cached mass on A_p(s)
                1 - batch["cand_logprobs"][b, t].exp()[batch["cand_mask"][b, t]].sum().item(), abs=1e-5
            )
    for name, terms in (("forward", fwd), ("reverse", rev), ("jsd", jsd)):
        assert results[name].item() == pytest.approx(np.mean(terms), rel=1e-4), name
    assert min(np.mean(fwd), np.mean(rev), np.mean(jsd)) > 0


HORIZON = 3


def sequence_batch(teacher: MarkovTeacher, seqs):
    """Sequences after prompt [0], annotated by the Markov teacher over its whole vocabulary (p = 1)."""
    items = []
    for seq in seqs:
        ann = teacher.annotate(torch.tensor([[0, *seq]]), top_k=teacher.vocab_size, top_p=1.0)
        items.append(record_tensors(annotated_record(ann, 0, [0], seq, seq[-1] == teacher.eos_token_id)))
    return collate(items, teacher.pad_token_id)


def all_sequences(v: int, eos: int):
    for n in range(1, HORIZON + 1):
        for seq in itertools.product(range(v), repeat=n):
            if eos not in seq[:-1] and (n == HORIZON or seq[-1] == eos):
                yield list(seq)


def exact_reverse_kl(student: TabularStudent, teacher: MarkovTeacher, seqs) -> torch.Tensor:
    log_s = torch.log_softmax(student.model.weight.T.double(), -1)  # [state, action]
    log_t = teacher.logprobs
    total = 0.0
    for seq in seqs:
        lp_s = sum(log_s[last, tok] for last, tok in zip([0, *seq[:-1]], seq))
        lp_t = sum(log_t[last, tok] for last, tok in zip([0, *seq[:-1]], seq))
        total = total + lp_s.exp() * (lp_s - lp_t)
    return total


def minillm_problem(teacher_mix: float = 0.0):
    teacher = MarkovTeacher(vocab_size=4, seed=2, eos_bias=-0.5)
    torch.manual_seed(0)
    student = TabularStudent(4)
    with torch.no_grad():
        student.model.weight.copy_(torch.randn(4, 4))
    agent = make_agent(
        "minillm", student, length_norm=False, baseline="none", teacher_mix=teacher_mix, clip=1e9, cliprange=0.2
    )
    return teacher, student, agent


def test_minillm_expected_gradient_is_the_reverse_kl_gradient():
    teacher, student, agent = minillm_problem()
    seqs = list(all_sequences(4, teacher.eos_token_id))
    kl = exact_reverse_kl(student, teacher, seqs)
    (exact,) = torch.autograd.grad(kl, student.model.weight)
    log_s = torch.log_softmax(student.model.weight.T.detach().double(), -1)
    expected = torch.zeros_like(exact)
    total_p = 0.0
    for seq in seqs:
        p = math.exp(sum(log_s[last, tok].item() for last, tok in zip([0, *seq[:-1]], seq)))
        total_p += p
        student.model.weight.grad = None
        loss, _ = agent(sequence_batch(teacher, [seq]))
        loss.backward()
        expected += p * student.model.weight.grad
    assert total_p == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(expected.double(), exact.double(), atol=1e-5), (expected - exact).abs().max()
    assert exact.abs().max() > 1e-2  # a real gradient, not a trivial zero


def test_minillm_monte_carlo_gradient_from_env_rollouts_within_3_se():
    teacher, student, agent = minillm_problem()
    seqs = list(all_sequences(4, teacher.eos_token_id))
    (exact,) = torch.autograd.grad(exact_reverse_kl(student, teacher, seqs), student.model.weight)
    direction = torch.randn(exact.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    env = TokenGenerationVectorEnv(teacher, [[0]], num_envs=16, top_k=4, top_p=1.0, max_new_tokens=HORIZON)
    estimates = []
    for k in range(40):
        records = rollout(env, StudentPolicy(agent, seed=k), 64, seed=k)
        items = [record_tensors(r) for r in records]
        student.model.weight.grad = None
        loss, _ = agent(collate(items, teacher.pad_token_id))
        loss.backward()
        estimates.append((student.model.weight.grad.double() * direction).sum().item())
    target = (exact.double() * direction).sum().item()
    mean, se = np.mean(estimates), np.std(estimates, ddof=1) / math.sqrt(len(estimates))
    assert abs(mean - target) < 3 * se, (mean, target, se)
    assert se < 0.2 * abs(target)  # the estimate is informative, not a wide band


def test_compare_with_the_on_policy_agents(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path / "cache"))
    tiny = [
        "--teacher",
        "tiny",
        "--student",
        "tiny",
        "--data",
        "bundled",
        "--train-prompts",
        "16",
        "--response-tokens",
        "6",
        "--batch-size",
        "4",
        "--eval-prompts",
        "3",
        "--eval-max-new-tokens",
        "6",
        "--online-episodes",
        "4",
        "--online-envs",
        "2",
        "--online-max-new-tokens",
        "5",
    ]
    out = tmp_path / "cmp"
    assert (
        main(["compare", "--agents", "bd,minillm,gkd", "--steps", "2", "--eval-every", "0", "--out", str(out), *tiny])
        == 0
    )
    text = capsys.readouterr().out
    assert "| minillm | 1 |" in text and "| gkd | 1 |" in text and "| bd | 1 |" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / "minillm-seed0"))
    acc.Reload()
    assert {"rollout/return", "rollout/coverage", "rollout/length", "loss/minillm"} <= set(acc.Tags()["scalars"])


def test_student_policy_records_the_probabilities_it_sampled_from():
    """Sampling over the whole vocabulary from mu = alpha pi_T(.|A_p) + (1 - alpha) pi_S: each step's
    behaviour_logprob is log mu(a|s) and student_logprob log pi_S(a|s), checked against the models. The
    mixture is MiniLLM's behaviour hook (teacher_mix 0.3): StudentPolicy takes no mixing argument."""
    teacher, student, agent = minillm_problem(teacher_mix=0.3)
    env = TokenGenerationVectorEnv(teacher, [[0]], num_envs=4, top_k=4, top_p=0.8, max_new_tokens=HORIZON)
    records = rollout(env, StudentPolicy(agent, seed=1), 12, seed=1)
    log_s = torch.log_softmax(student.model.weight.T.detach().double(), -1)
    checked = 0
    for rec in records:
        for i, (state, action) in enumerate(zip([0, *rec["response_ids"][:-1]], rec["response_ids"])):
            cand = torch.tensor(rec["cand_ids"][i])
            mask = torch.tensor(rec["cand_mask"][i])
            t_probs = torch.zeros(4, dtype=torch.float64)
            t_probs[cand[mask]] = torch.softmax(teacher.logprobs[state][cand[mask]], 0)
            mu = 0.3 * t_probs[action] + 0.7 * log_s[state, action].exp()
            assert rec["behaviour_logprob"][i] == pytest.approx(math.log(mu), abs=1e-5)
            assert rec["student_logprob"][i] == pytest.approx(log_s[state, action].item(), abs=1e-5)
            checked += 1
    assert checked > 20


def test_minillm_reuses_episodes_with_clipped_importance_ratios_by_hand():
    """Episodes collected under mu (teacher-mixed), trained on after the student moved: the loss is
    (1/#seq) sum_t [KL(pi_S || pi_T)(s_t) + max(A_t rho_t, A_t clip(rho_t, 0.8, 1.2))], rho = pi_S / mu,
    A_t the cost-to-go after t of c = log pi_S_then - log pi_T."""
    teacher, student, agent = minillm_problem(teacher_mix=0.3)
    env = TokenGenerationVectorEnv(teacher, [[0]], num_envs=4, top_k=4, top_p=1.0, max_new_tokens=HORIZON)
    records = rollout(env, StudentPolicy(agent, seed=2), 8, seed=2)
    with torch.no_grad():
        student.model.weight.add_(0.5 * torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))
    loss, metrics = agent(collate([record_tensors(r) for r in records], teacher.pad_token_id))
    log_s = torch.log_softmax(student.model.weight.T.detach().double(), -1)
    log_t = teacher.logprobs
    total, clipped = 0.0, 0
    for rec in records:
        states = [0, *rec["response_ids"][:-1]]
        costs = [
            rec["student_logprob"][i] - log_t[s, a].item() for i, (s, a) in enumerate(zip(states, rec["response_ids"]))
        ]
        for i, (s, a) in enumerate(zip(states, rec["response_ids"])):
            kl = (log_s[s].exp() * (log_s[s] - log_t[s])).sum().item()
            future = sum(costs[i + 1 :])
            rho = math.exp(log_s[s, a].item() - rec["behaviour_logprob"][i])
            term = max(future * rho, future * min(max(rho, 0.8), 1.2))
            clipped += future * min(max(rho, 0.8), 1.2) > future * rho
            total += kl + term
    assert loss.item() == pytest.approx(total / len(records), rel=1e-4)
    assert clipped > 0  # some ratios were clipped: the PPO branch is exercised
