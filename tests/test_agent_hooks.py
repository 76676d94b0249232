"""The agent hooks the trainer reads, each explicit: the teacher given at construction, the behaviour
distribution episodes are sampled from, on_policy's preset, auxiliary loss terms; and the kit's
checks of them, which must fail on agents that break them."""

import copy

import numpy as np
import pytest
import torch

from tdrl.agents import (
    BC,
    ON_POLICY_PRESET,
    Agent,
    AuxiliaryTerm,
    BCConfig,
    BDConfig,
    get_agent,
    make_agent,
    register_agent,
)
from tdrl.agents.registry import _REGISTRY
from tdrl.envs import StudentPolicy, TokenGenerationVectorEnv, rollout
from tdrl.errors import ConfigError
from tdrl.testing import MarkovTeacher
from tdrl.testing.agent_contract import (
    TabularStudent,
    check_auxiliary_term,
    check_behaviour,
    check_student_policy,
    check_teacher_hook,
    contract_batch,
)
from tdrl.testing.support import own_episodes
from tdrl.training import TrainConfig


def tiny_student():
    from tdrl.models import load_student

    torch.manual_seed(0)
    return load_student("tiny")


@pytest.fixture
def registered():
    """Register test agents for one test and remove them afterwards (the registry is global)."""
    names = []

    def register(name, cls):
        register_agent(name)(cls)
        names.append(name)
        return cls

    yield register
    for name in names:
        _REGISTRY.pop(name, None)


# ---------------------------------------------------------------------- make_agent and its config


def test_make_agent_takes_a_config_instance_of_its_own_class():
    student = TabularStudent(4)
    config = BCConfig(mode="sft")
    agent = make_agent("bc", student, config)
    assert agent.config is config  # used as is
    changed = make_agent("bc", student, config, support_coef=0.25)
    assert changed.config.support_coef == 0.25 and changed.config.mode == "sft" and config.support_coef == 0.0
    with pytest.raises(ConfigError, match="support_coef"):  # the replaced config is validated again
        make_agent("bc", student, config, support_coef=-1.0)
    with pytest.raises(ConfigError, match="no setting"):
        make_agent("bc", student, config, alpha=0.3)
    with pytest.raises(ConfigError, match="takes a IQLearnConfig, got a BDConfig"):  # bd's, not iqlearn's
        make_agent("iqlearn", student, BDConfig())
    with pytest.raises(ConfigError, match="takes a SQLConfig, got a BCConfig"):
        make_agent("sql", student, config)


def test_settings_may_not_shadow_make_agents_parameters(registered):
    from dataclasses import dataclass

    from tdrl.agents import AgentConfig, hp

    @dataclass
    class ShadowConfig(AgentConfig):
        teacher: str = hp("x", "a setting named like make_agent's teacher=")

    class Shadow(BC):
        Config = ShadowConfig

    with pytest.raises(ConfigError, match="rename the setting"):
        registered("test-shadow", Shadow)


# ---------------------------------------------------------------------- the teacher


def test_kd_online_needs_the_teacher_at_construction_and_keeps_it_out_of_its_state(tiny_teacher):
    with pytest.raises(ConfigError, match=r"pass teacher="):
        make_agent("kd-online", tiny_student())
    agent = make_agent("kd-online", tiny_student(), teacher=tiny_teacher)
    assert agent.teacher is tiny_teacher
    keys = set(agent.state_dict())
    assert keys == set(make_agent("bc", tiny_student()).state_dict())  # nothing beside the student
    agent.to(torch.float64)  # .to() moves the agent's own tensors, never the teacher's
    assert agent.student.output_weight().dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in tiny_teacher.model.parameters())
    assert copy.deepcopy(agent).teacher is tiny_teacher  # shared, not copied
    with pytest.raises(AttributeError):
        agent.teacher = None  # read-only: given at construction only
    assert not hasattr(Agent, "attach_teacher") and not hasattr(Agent, "uses_teacher")


def test_an_agent_without_needs_teacher_keeps_the_teacher_it_is_given(tiny_teacher):
    assert make_agent("bc", tiny_student()).teacher is None
    assert make_agent("bc", tiny_student(), teacher=tiny_teacher).teacher is tiny_teacher


def test_a_subclass_init_must_pass_the_teacher_on():
    with pytest.raises(TypeError, match="teacher=None"):

        class Old(BC):
            def __init__(self, student, config=None):
                super().__init__(student, config)

    class New(BC):
        def __init__(self, student, config=None, *, teacher=None):
            super().__init__(student, config, teacher=teacher)

    assert New(TabularStudent(4), teacher="t").teacher == "t"


# ---------------------------------------------------------------------- behaviour


def test_minillm_behaviour_is_the_teacher_mixture_by_hand():
    """mu = alpha pi_T + (1 - alpha) pi_S with alpha = teacher_mix, numbers by hand (alpha 0.2):
    student (0.5, 0.3, 0.2, 0), teacher (0, 0.75, 0.25, 0) -> (0.4, 0.39, 0.21, 0)."""
    student = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    teacher = torch.tensor([[0.0, 0.75, 0.25, 0.0]])
    agent = make_agent("minillm", TabularStudent(4), teacher_mix=0.2)
    assert torch.allclose(agent.behaviour(student, teacher), torch.tensor([[0.4, 0.39, 0.21, 0.0]]), atol=1e-7)
    unmixed = make_agent("minillm", TabularStudent(4), teacher_mix=0.0)
    assert torch.equal(unmixed.behaviour(student, teacher), student)
    for name in ("bc", "gkd", "bd"):  # the default: the student's own policy
        assert torch.equal(make_agent(name, TabularStudent(4)).behaviour(student, teacher), student)


class Greedy(BC):
    """Samples the student's least likely token: a behaviour no sampler would pick by accident."""

    def behaviour(self, student_probs, teacher_probs):
        return torch.nn.functional.one_hot(student_probs.argmin(-1), student_probs.shape[-1]).float()


def test_student_policy_samples_from_the_agents_behaviour():
    """StudentPolicy draws every token from agent.behaviour: with a one-hot behaviour on the student's
    least likely token every action is that token, its behaviour_logprob 0 and its student_logprob
    the student's own (low) log-probability."""
    teacher = MarkovTeacher(vocab_size=6, seed=1)
    student = TabularStudent(6)
    with torch.no_grad():
        student.model.weight.copy_(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    agent = Greedy(student)
    env = TokenGenerationVectorEnv(teacher, [[0]], num_envs=3, top_k=6, top_p=1.0, max_new_tokens=3)
    log_s = torch.log_softmax(student.model.weight.T.detach().double(), -1)  # [state, action]
    records = rollout(env, StudentPolicy(agent, seed=0), 6, seed=0)
    for rec in records:
        for state, action, b, s in zip(
            [0, *rec["response_ids"][:-1]], rec["response_ids"], rec["behaviour_logprob"], rec["student_logprob"]
        ):
            assert action == int(log_s[state].argmin())
            assert b == pytest.approx(0.0, abs=1e-6)
            assert s == pytest.approx(log_s[state, action].item(), abs=1e-5) and s < np.log(1 / 6)


def test_student_policy_refuses_a_behaviour_of_the_wrong_shape():
    class Wrong(BC):
        def behaviour(self, student_probs, teacher_probs):
            return student_probs[:, :-1]

    env = TokenGenerationVectorEnv(MarkovTeacher(vocab_size=4), [[0]], num_envs=2, top_k=4, max_new_tokens=2)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="behaviour returned shape"):
        StudentPolicy(Wrong(TabularStudent(4)))(obs)


# ---------------------------------------------------------------------- on_policy


def test_on_policy_sets_the_trainer_preset_and_the_kits_episodes():
    """on_policy says the agent trains on its own episodes: the preset collects them every 10 steps and
    fills every batch with them (an agent's own preset wins), the trainer config takes it, and the
    kit collects episodes for it (none for an offline agent)."""
    assert get_agent("minillm").on_policy and get_agent("minillm").trainer_defaults == ON_POLICY_PRESET
    args = TrainConfig(agent="minillm").resolve()
    assert (args.online.every, args.online.ratio) == (10, 1.0)
    assert TrainConfig.from_dict({"agent": "minillm", "online_every": 0}).resolve().online.every == 0  # the user's

    class Own(BC):
        on_policy = True
        trainer_defaults = {"online_every": 3}

    assert Own.trainer_defaults == {"online_every": 3, "online_ratio": 1.0}
    assert BC.trainer_defaults == {} and not get_agent("gkd").on_policy
    teacher = MarkovTeacher(vocab_size=4)
    assert own_episodes(make_agent("bc", TabularStudent(4)), teacher, top_k=4, top_p=1.0, horizon=2) is None
    collect = own_episodes(Own(TabularStudent(4)), teacher, top_k=4, top_p=1.0, horizon=2, episodes=4)
    assert collect(0)["input_ids"].shape[0] == 4


# ---------------------------------------------------------------------- auxiliary terms


def squared_head(agent, inputs):
    """An auxiliary term with a known gradient: sum(W^2) * scale, gradient 2 W scale."""
    weight = agent.student.output_weight()
    return (weight.pow(2).sum() * inputs["scale"]), {"aux/scale": inputs["scale"]}


def test_an_auxiliary_term_adds_exactly_coef_times_its_value_and_gradient():
    agent, batch = make_agent("bc", tiny_student()), contract_batch()
    weight = agent.student.output_weight()
    scale = torch.tensor(0.01)
    base, base_metrics = agent(batch)
    (base_grad,) = torch.autograd.grad(base, weight)
    term = AuxiliaryTerm("sq", 0.5, {"scale": scale}, squared_head)
    loss, metrics = agent(batch, auxiliary=[term])
    (grad,) = torch.autograd.grad(loss, weight)
    value = (weight.detach().pow(2).sum() * scale).item()
    assert metrics["loss/sq"].item() == pytest.approx(value, rel=1e-6)  # unweighted
    assert (loss - base).item() == pytest.approx(0.5 * value, rel=1e-5)
    assert torch.allclose(grad - base_grad, 0.5 * 2 * weight.detach() * scale, atol=1e-7)
    assert float(metrics["aux/scale"]) == pytest.approx(0.01) and not metrics["loss/sq"].requires_grad
    assert set(metrics) - set(base_metrics) == {"loss/sq", "aux/scale"}
    zero, zero_metrics = agent(batch, auxiliary=[AuxiliaryTerm("sq", 0.0, {"scale": scale}, squared_head)])
    assert zero.item() == base.item() and "loss/sq" in zero_metrics  # coef 0: logged, not trained on


def test_auxiliary_terms_are_checked():
    agent, batch = make_agent("bc", tiny_student()), contract_batch()
    ok = {"scale": torch.tensor(1.0)}
    for bad, match in (
        (dict(name="Loss"), "lower-case"),
        (dict(name="a/b"), "lower-case"),
        (dict(coef=float("nan")), "finite"),
        (dict(coef=True), "finite"),
        (dict(inputs=[1]), "dict"),
        (dict(fn="squared_head"), "callable"),
    ):
        fields = dict(name="sq", coef=1.0, inputs=ok, fn=squared_head) | bad
        with pytest.raises(ConfigError, match=match):
            AuxiliaryTerm(**fields)
    with pytest.raises(ConfigError, match="auxiliary=\\[term\\]"):
        agent(batch, auxiliary=AuxiliaryTerm("sq", 1.0, ok, squared_head))
    with pytest.raises(ConfigError, match="loss/bc, already logged"):  # bc's own loss metric
        agent(batch, auxiliary=[AuxiliaryTerm("bc", 1.0, ok, squared_head)])
    twice = [AuxiliaryTerm("sq", 1.0, ok, squared_head), AuxiliaryTerm("sq", 1.0, ok, squared_head)]
    with pytest.raises(ConfigError, match="already logged"):
        agent(batch, auxiliary=twice)
    with pytest.raises(ConfigError, match="0-dim loss"):
        agent(batch, auxiliary=[AuxiliaryTerm("vec", 1.0, ok, lambda a, i: (torch.ones(2), {}))])


# ---------------------------------------------------------------------- the kit fails on broken hooks


class Unnormalised(BC):
    def behaviour(self, student_probs, teacher_probs):
        return student_probs + teacher_probs


class IgnoresAuxiliary(BC):
    def forward(self, batch, *, diagnostics=False, auxiliary=()):
        return super().forward(batch, diagnostics=diagnostics)


class DoubleAuxiliary(BC):
    def forward(self, batch, *, diagnostics=False, auxiliary=()):
        doubled = [AuxiliaryTerm(t.name, 2 * t.coef, t.inputs, t.fn) for t in auxiliary]
        return super().forward(batch, diagnostics=diagnostics, auxiliary=doubled)


class TeacherInState(BC):
    needs_teacher = True

    def __init__(self, student, config=None, *, teacher=None):
        super().__init__(student, config, teacher=teacher)
        self.teacher_model = teacher.model  # a registered submodule: saved, moved and trained with the agent


class InventsATeacher(BC):
    """Needs the teacher, yet builds without one (it makes one up)."""

    needs_teacher = True

    def __init__(self, student, config=None, *, teacher=None):
        super().__init__(student, config, teacher=teacher if teacher is not None else object())


class OffPolicyPreset(BC):
    on_policy = True
    trainer_defaults = {"online_ratio": 0.5}


@pytest.mark.parametrize(
    "cls, check, match",
    [
        (Unnormalised, check_behaviour, "sum to 1"),
        (IgnoresAuxiliary, check_auxiliary_term, "did not log the term"),
        (DoubleAuxiliary, check_auxiliary_term, "coef"),
        (TeacherInState, check_teacher_hook, "teacher's weights"),
        (OffPolicyPreset, check_teacher_hook, "own episodes only"),
        (InventsATeacher, check_teacher_hook, "built without a teacher"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_the_kit_fails_agents_that_break_a_hook(registered, cls, check, match):
    name = f"test-{cls.__name__.lower()}"
    registered(name, cls)
    with pytest.raises(AssertionError, match=match):
        check(name)


def test_the_kit_fails_a_student_policy_that_ignores_the_behaviour(monkeypatch):
    """check_student_policy recomputes log mu(a|s) from agent.behaviour: a StudentPolicy that sampled
    from the student alone would pass for every default agent but fails for MiniLLM's mixture."""
    check_student_policy("minillm", teacher_mix=0.5)
    original = StudentPolicy.__init__

    def student_only(self, agent, seed=0, temperature=1.0):
        original(self, _StudentOnly(agent), seed, temperature)

    monkeypatch.setattr(StudentPolicy, "__init__", student_only)
    with pytest.raises(AssertionError, match="behaviour_logprob"):
        check_student_policy("minillm", teacher_mix=0.5)


class _StudentOnly:
    """The agent seen by a policy that ignored its behaviour hook."""

    def __init__(self, agent):
        self.student, self.policy_logits = agent.student, agent.policy_logits

    def behaviour(self, student_probs, teacher_probs):
        return student_probs
