"""The Gymnasium token-generation environment against brute force and independent computations."""

import itertools
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

import tdrl  # noqa: F401  (registers the env id)
from tdrl.actions import in_set
from tdrl.envs import ENV_ID, RandomMaskedPolicy, TeacherPolicy, TokenGenerationEnv, TokenGenerationVectorEnv, rollout
from tdrl.errors import ConfigError

PROMPTS = ["What is the capital of France?", "Name three colors.", "hi", "Rewrite: I walk to school."]


@pytest.fixture
def env(tiny_teacher):
    return TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=6, render_mode="ansi")


def test_check_env_passes_on_tiny_teacher(tiny_teacher):
    check_env(TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=5, render_mode="ansi"), skip_render_check=False)


@pytest.mark.slow
def test_check_env_passes_on_bundled_teacher(bundled_teacher):
    check_env(TokenGenerationEnv(bundled_teacher, PROMPTS[:2], max_new_tokens=3))


def test_registered_make_and_make_vec(tiny_teacher):
    env = gym.make(ENV_ID, teacher=tiny_teacher, prompts=PROMPTS, max_new_tokens=4)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["action_mask"].dtype == np.int8 and info["action_mask"].shape == (tiny_teacher.vocab_size,)
    envs = gym.make_vec(
        ENV_ID,
        num_envs=8,
        vectorization_mode="vector_entry_point",
        teacher=tiny_teacher,
        prompts=PROMPTS,
        max_new_tokens=4,
    )
    assert isinstance(envs.unwrapped, TokenGenerationVectorEnv)
    obs, _ = envs.reset(seed=0)
    assert obs["cand_ids"].shape == (8, 64) and envs.observation_space.contains(obs)
    obs, reward, term, trunc, info = envs.step(envs.action_space.sample())
    assert reward.shape == (8,) and envs.observation_space.contains(obs)


def test_masks_agree_across_channels(env):
    obs, info = env.reset(seed=1)
    dense = np.zeros(env.action_space.n, dtype=np.int8)
    dense[obs["cand_ids"][obs["cand_mask"] == 1]] = 1
    assert np.array_equal(info["action_mask"], dense)
    assert np.array_equal(env.action_masks(), dense.astype(bool))
    assert np.isneginf(obs["cand_logprobs"][obs["cand_mask"] == 0]).all()
    assert np.isfinite(obs["cand_logprobs"][obs["cand_mask"] == 1]).all()
    assert info["state_support_size"] == obs["cand_mask"].sum()


def markov_sequences(logprobs: torch.Tensor, start: int, horizon: int, eos: int):
    """Every response of at most ``horizon`` tokens (ending at EOS or the limit) with its log-prob."""
    for n in range(1, horizon + 1):
        for seq in itertools.product(range(logprobs.shape[0]), repeat=n):
            if eos in seq[:-1] or (n < horizon and seq[-1] != eos):
                continue
            last, lp = start, 0.0
            for tok in seq:
                lp += logprobs[last, tok].item()
                last = tok
            yield seq, lp


def test_teacher_policy_return_is_minus_sequence_entropy_on_markov_teacher(markov_teacher):
    horizon, start = 4, 0
    table, eos = markov_teacher.logprobs, markov_teacher.eos_token_id
    seqs = list(markov_sequences(table, start, horizon, eos))
    total = sum(math.exp(lp) for _, lp in seqs)
    assert total == pytest.approx(1.0, abs=1e-12)  # the enumeration covers the whole distribution
    exact = sum(math.exp(lp) * lp for _, lp in seqs)  # E[sum_t log pi_T] = -H(sequences)

    env = TokenGenerationVectorEnv(markov_teacher, [[start]], num_envs=16, top_k=16, top_p=1.0, max_new_tokens=horizon)
    records = rollout(env, TeacherPolicy(seed=0), 3000, seed=0)
    returns = np.array([r["return"] for r in records])
    by_seq = {seq: lp for seq, lp in seqs}
    for r in records[:200]:  # each return is that sequence's exact teacher log-likelihood
        assert r["return"] == pytest.approx(by_seq[tuple(r["response_ids"])], abs=1e-5)
    stderr = returns.std(ddof=1) / math.sqrt(len(returns))
    assert abs(returns.mean() - exact) < 3 * stderr, (returns.mean(), exact, stderr)


def test_episode_return_is_teacher_loglik_of_response(tiny_teacher):
    env = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=10, top_p=0.9)
    record = rollout(env, RandomMaskedPolicy(seed=3), 1, seed=7)[0]
    ids = torch.tensor([record["prompt_ids"] + record["response_ids"]])
    logprobs = torch.log_softmax(tiny_teacher.logits(ids)[0].double(), -1)
    n = len(record["prompt_ids"])
    loglik = sum(logprobs[n - 1 + i, tok].item() for i, tok in enumerate(record["response_ids"]))
    assert record["return"] == pytest.approx(loglik, abs=1e-4)


def test_rollout_records_match_offline_annotation(tiny_teacher):
    env = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=8, top_k=32, top_p=0.8)
    for record in rollout(env, TeacherPolicy(seed=1), 3, seed=2):
        ids = torch.tensor([record["prompt_ids"] + record["response_ids"]])
        n, m = len(record["prompt_ids"]), len(record["response_ids"])
        ann = tiny_teacher.annotate(ids, top_k=32, top_p=0.8)
        sub = ann.subset[0, n - 1 : n - 1 + m]
        assert torch.equal(torch.tensor(record["cand_ids"]), sub.ids)
        assert torch.equal(torch.tensor(record["cand_mask"]), sub.mask)
        assert torch.allclose(torch.tensor(record["cand_logprobs"]), sub.masked_logprobs(), atol=1e-4)
        assert torch.allclose(
            torch.tensor(record["action_logprob"]), ann.token_logprob[0, n - 1 : n - 1 + m], atol=1e-4
        )
        assert in_set(sub.ids, sub.mask, torch.tensor(record["response_ids"])).all()  # TeacherPolicy stays inside A_p
        final = ann.subset[0, n - 1 + m]  # the state after the last token: what a truncated episode bootstraps from
        assert torch.equal(torch.tensor(record["final_cand_ids"]), final.ids)
        assert torch.equal(torch.tensor(record["final_cand_mask"]), final.mask)
        assert torch.allclose(torch.tensor(record["final_cand_logprobs"]), final.masked_logprobs(), atol=1e-4)


def deterministic_action(obs, t):
    size = int(obs["cand_mask"].sum())
    return int(obs["cand_ids"][t % size])


def test_vector_env_matches_single_envs(tiny_teacher):
    kwargs = dict(max_new_tokens=5, top_k=16, top_p=0.8)
    n = 4
    singles = [TokenGenerationEnv(tiny_teacher, PROMPTS, **kwargs) for _ in range(n)]
    vec = TokenGenerationVectorEnv(tiny_teacher, PROMPTS, num_envs=n, **kwargs)
    s_obs = [e.reset(seed=10 + i)[0] for i, e in enumerate(singles)]
    v_obs, _ = vec.reset(seed=10)
    ended = [False] * n
    resets = 0
    for t in range(17):  # three episodes per sub-env, with autoresets in between
        actions = np.array([deterministic_action(o, t + i) for i, o in enumerate(s_obs)])
        v_obs, v_rew, v_term, v_trunc, _ = vec.step(actions)
        for i, env in enumerate(singles):
            if ended[i]:
                s_obs[i], _ = env.reset()
                assert v_rew[i] == 0 and not v_term[i] and not v_trunc[i]
                ended[i], resets = False, resets + 1
            else:
                s_obs[i], rew, term, trunc, _ = env.step(actions[i])
                assert rew == pytest.approx(v_rew[i], abs=1e-4)
                assert (term, trunc) == (v_term[i], v_trunc[i])
                ended[i] = term or trunc
            for key in ("input_ids", "length", "prompt_length", "cand_ids", "cand_mask"):
                assert np.array_equal(s_obs[i][key], v_obs[key][i]), (t, i, key)
            assert np.allclose(s_obs[i]["cand_logprobs"], v_obs["cand_logprobs"][i], atol=1e-4)
    assert resets >= n * 2


def test_naive_reencoding_env_gives_the_same_transitions(tiny_teacher):
    fast = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=6)
    naive = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=6, kv_cache=False)
    a, _ = fast.reset(seed=4)
    b, _ = naive.reset(seed=4)
    for t in range(6):
        action = deterministic_action(a, t)
        a, ra, *_ = fast.step(action)
        b, rb, *_ = naive.step(action)
        assert ra == pytest.approx(rb, abs=1e-4)
        assert np.array_equal(a["cand_ids"], b["cand_ids"])


def off_support_action(obs, info):
    outside = np.flatnonzero(info["action_mask"] == 0)
    return int(outside[len(outside) // 2])


@pytest.mark.parametrize("mode", ["allow", "penalize", "terminate"])
def test_off_support_modes(tiny_teacher, mode):
    env = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=6, off_support=mode, off_support_penalty=-7.5)
    obs, info = env.reset(seed=0)
    logprobs = torch.log_softmax(
        tiny_teacher.logits(torch.from_numpy(obs["input_ids"][None, : obs["length"]]))[0, -1], -1
    )
    action = off_support_action(obs, info)
    obs2, reward, terminated, truncated, info2 = env.step(action)
    assert info2["in_support"] is False
    assert info2["teacher_logprob"] == pytest.approx(logprobs[action].item(), abs=1e-4)
    if mode == "allow":
        assert reward == pytest.approx(logprobs[action].item(), abs=1e-4) and not terminated
    elif mode == "penalize":
        assert reward == -7.5 and not terminated
    else:
        assert reward == -7.5 and terminated
    assert obs2["length"] == obs["length"] + 1 and obs2["input_ids"][obs["length"]] == action
    # an in-support action is never penalised
    env.reset(seed=0)
    _, reward, terminated, _, info3 = env.step(int(obs["cand_ids"][0]))
    assert info3["in_support"] is True and reward == pytest.approx(logprobs[obs["cand_ids"][0]].item(), abs=1e-4)


@pytest.mark.parametrize("action", [-1, 512, 10**9, 2.5, "a"])
def test_bad_action_ids_raise(env, action):
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(action)


def test_step_before_reset_and_after_end_raise(env):
    with pytest.raises(ResetNeeded):
        env.step(0)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        obs, _, term, trunc, _ = env.step(int(obs["cand_ids"][0]))
        done = term or trunc
    with pytest.raises(ResetNeeded):
        env.step(0)


def test_eos_terminates_and_limit_truncates(tiny_teacher):
    env = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=3)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(tiny_teacher.eos_token_id)
    assert terminated and not truncated
    obs, _ = env.reset(seed=0)
    flags = [env.step(int(obs["cand_ids"][0]))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_reset_is_seeded_and_takes_a_given_prompt(env, tiny_teacher):
    a = [env.reset(seed=s)[1]["prompt_index"] for s in range(8)]
    b = [env.reset(seed=s)[1]["prompt_index"] for s in range(8)]
    assert a == b and len(set(a)) > 1
    obs, info = env.reset(options={"prompt": "hi"})
    ids = tiny_teacher.encode_prompt("hi")
    assert info["prompt_index"] == -1 and obs["input_ids"][: obs["length"]].tolist() == ids
    obs, _ = env.reset(options={"prompt": ids[:3]})
    assert obs["input_ids"][: obs["length"]].tolist() == ids[:3]
    with pytest.raises(ValueError, match="max_prompt_len"):
        env.reset(options={"prompt": "a much longer prompt " * 20})


def test_inverse_soft_q_reward_matches_annotation(tiny_teacher):
    env = TokenGenerationEnv(tiny_teacher, PROMPTS, max_new_tokens=5, reward="inverse_soft_q", gamma=0.9)
    obs, _ = env.reset(seed=5)
    actions, rewards = [], []
    for t in range(4):
        actions.append(deterministic_action(obs, t))
        obs, r, *_ = env.step(actions[-1])
        rewards.append(r)
    prompt = obs["input_ids"][: obs["prompt_length"]].tolist()
    ann = tiny_teacher.annotate(torch.tensor([prompt + actions]), reward="inverse_soft_q", gamma=0.9)
    assert np.allclose(rewards, ann.reward[0, len(prompt) - 1 :].numpy(), atol=1e-4)


def test_render_marks_off_support_tokens(env, tiny_teacher):
    obs, info = env.reset(options={"prompt": "hi"})
    env.step(int(obs["cand_ids"][0]))
    _, _, _, _, info = env.step(off_support_action(*env.reset(options={"prompt": "hi"})))
    text = env.render()
    assert text.startswith(tiny_teacher.render_prompt("hi")) and "[!" in text and "!]" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"off_support": "explode"}, "off_support"),
        ({"reward": "entropy"}, "reward"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": []}, "prompt"),
    ],
)
def test_bad_configuration_raises(tiny_teacher, kwargs, match):
    args = {"prompts": PROMPTS} | kwargs
    with pytest.raises((ConfigError, ValueError), match=match):
        TokenGenerationEnv(tiny_teacher, args.pop("prompts"), **args)


def test_policies_return_actions_and_extras(tiny_teacher):
    """Every env policy returns (actions, extras): extras {} for the teacher and uniform policies, on a
    batched observation (one action per row) and on a single one (one action)."""
    vec = TokenGenerationVectorEnv(tiny_teacher, PROMPTS, num_envs=3, top_k=16, max_new_tokens=3)
    obs, _ = vec.reset(seed=0)
    for policy in (TeacherPolicy(seed=0), RandomMaskedPolicy(seed=0)):
        actions, extras = policy(obs)
        assert extras == {} and actions.shape == (3,)
        assert all(a in obs["cand_ids"][row][obs["cand_mask"][row] == 1] for row, a in enumerate(actions))
        action, extras = policy({k: v[0] for k, v in obs.items()})
        assert extras == {} and np.ndim(action) == 0


class ExtrasPolicy:
    """The first candidate of each row, reporting its row index and its step count as extras."""

    def __init__(self):
        self.calls = 0

    def __call__(self, obs):
        self.calls += 1
        rows = np.arange(obs["cand_ids"].shape[0]) if obs["cand_ids"].ndim == 2 else np.int64(0)
        first = obs["cand_ids"][..., 0]
        return first, {"row": rows.astype(float), "call": np.full(np.shape(rows), float(self.calls))}


def test_rollout_stores_the_policys_extras_per_step(tiny_teacher):
    """The policy's extras reach the records step by step and row by row (single and vector env); a
    policy that returns bare actions is refused with a message saying what to return."""
    vec = TokenGenerationVectorEnv(tiny_teacher, PROMPTS, num_envs=2, top_k=16, max_new_tokens=3)
    for record in rollout(vec, ExtrasPolicy(), 4, seed=0):
        assert len(record["row"]) == len(record["response_ids"]) == len(record["call"])
        assert len(set(record["row"])) == 1  # one episode lives in one row
        assert record["call"] == sorted(record["call"]) and len(set(record["call"])) == len(record["call"])
    single = TokenGenerationEnv(tiny_teacher, PROMPTS, top_k=16, max_new_tokens=3)
    (record,) = rollout(single, ExtrasPolicy(), 1, seed=0)
    assert record["row"] == [0.0] * len(record["response_ids"])
    assert record["call"] == [float(i + 1) for i in range(len(record["response_ids"]))]
    with pytest.raises(TypeError, match=r"returns \(actions, extras\)"):
        rollout(single, lambda obs: obs["cand_ids"][0], 1, seed=0)


def test_vector_env_prompt_text_follows_each_row(tiny_teacher):
    """``prompt_text(row)``: the prompt of each sub-env's current episode, also after an autoreset
    draws a new one (what rollout records as the episode's prompt); a bad row raises."""
    vec = TokenGenerationVectorEnv(tiny_teacher, PROMPTS, num_envs=2, top_k=16, max_new_tokens=2)
    vec.reset(options={"prompts": [PROMPTS[2], PROMPTS[0]]})
    assert [vec.prompt_text(0), vec.prompt_text(1)] == [PROMPTS[2], PROMPTS[0]]
    for _ in range(3):  # two steps end both episodes (truncated, or EOS sooner), the next autoresets
        vec.step(vec.action_masks().argmax(-1))  # a token of each row's A_p(s)
    for row in range(2):
        assert vec.prompt_index[row] >= 0  # drawn from the pool by the autoreset (a given prompt has -1)
        assert vec.prompt_text(row) == PROMPTS[vec.prompt_index[row]]
    with pytest.raises(IndexError, match="valid rows are 0 .. 1"):
        vec.prompt_text(2)
    for record in rollout(vec, TeacherPolicy(seed=0), 6, seed=3):
        assert tiny_teacher.encode_prompt(record["prompt"]) == record["prompt_ids"]
