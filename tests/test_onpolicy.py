"""On-policy agents: MiniLLM's gradient against the exact sequence-level reverse KL, GKD against KD."""

import itertools
import math

import numpy as np
import pytest
import torch

from tdrl.agents import make_agent
from tdrl.cli import main
from tdrl.data import collate
from tdrl.envs import TokenGenerationVectorEnv, rollout
from tdrl.records import record_tensors
from tdrl.testing import MarkovTeacher
from tdrl.testing.agent_contract import CHECKS, TabularStudent, contract_batch
from tdrl.trainer import StudentPolicy


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["gkd", "minillm"])
def test_contract(name, check):
    check(name)


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_gkd_variants_pass_the_kit(divergence):
    for check in CHECKS:
        check("gkd", divergence=divergence, restrict="none")


def test_gkd_forward_kl_is_kd_on_the_same_batch():
    """lambda = 0 (offline batch) with the forward KL: the same gradient as bc-kd; the losses differ
    by the teacher's entropy on A_p(s), a constant."""
    from tdrl.students import load_student

    batch = contract_batch()
    grads, losses = [], []
    for name, kw in (("gkd", {"divergence": "forward"}), ("bc", {"mode": "kd"})):
        torch.manual_seed(0)
        student = load_student("tiny")
        loss, _ = make_agent(name, student, **kw).loss(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in student.model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    sel = batch["response_mask"]
    teacher = torch.log_softmax(batch["cand_logprobs"][sel].double(), -1)
    p = teacher.exp()
    entropy = -(p * teacher.masked_fill(~batch["cand_mask"][sel], 0.0)).sum(-1).mean().item()
    assert losses[1] - losses[0] == pytest.approx(entropy, abs=1e-5)


HORIZON = 3


def sequence_batch(teacher: MarkovTeacher, seqs):
    """Sequences after prompt [0], annotated by the Markov teacher over its whole vocabulary (p = 1)."""
    items = []
    for seq in seqs:
        ids = torch.tensor([[0, *seq]])
        ann = teacher.annotate(ids, top_k=teacher.vocab_size, top_p=1.0)
        sub = ann.subset[0, : len(seq)]
        items.append({
            "prompt_ids": torch.tensor([0]), "response_ids": torch.tensor(seq), "cand_ids": sub.ids,
            "cand_logprobs": sub.logprobs, "cand_mask": sub.mask, "action_logprob": ann.token_logprob[0],
            "action_in_cand": torch.ones(len(seq), dtype=torch.bool), "reward": ann.reward[0],
            "terminated": seq[-1] == teacher.eos_token_id,
        })  # fmt: skip
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


def minillm_problem():
    teacher = MarkovTeacher(vocab_size=4, seed=2, eos_bias=-0.5)
    torch.manual_seed(0)
    student = TabularStudent(4)
    with torch.no_grad():
        student.model.weight.copy_(torch.randn(4, 4))
    agent = make_agent("minillm", student, length_norm=False, baseline="none", teacher_mix=0.0, clip=1e9)
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
        loss, _ = agent.loss(sequence_batch(teacher, [seq]))
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
        loss, _ = agent.loss(collate(items, teacher.pad_token_id))
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
