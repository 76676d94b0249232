"""The kit's checks of the hooks the trainer reads (:mod:`tdrl.agents.base`), part of
:data:`tdrl.testing.agent_contract.CHECKS`:

* :func:`check_teacher_hook`: an agent with ``needs_teacher`` refuses to be built without a teacher;
  the teacher given is ``agent.teacher``, outside the module tree (no parameter, no ``state_dict``
  entry, shared by ``copy.deepcopy``); an ``on_policy`` agent's preset trains on its own episodes;
* :func:`check_behaviour`: ``agent.behaviour`` returns a distribution per row (same shape,
  non-negative, rows sum to 1) and leaves its inputs alone;
* :func:`check_auxiliary_term`: ``agent(batch, auxiliary=[term])`` adds exactly ``coef`` times the
  term's value to the loss and to the gradient, logs ``loss/<name>`` (unweighted) and the term's
  metrics, and refuses a term whose metric is already logged;
* :func:`check_student_policy`: :class:`tdrl.envs.StudentPolicy` returns ``(actions, extras)`` and
  samples from the agent's behaviour: the extras are log mu(a|s) and log pi_S(a|s) of the chosen
  tokens, recomputed here from the agent's hooks.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import torch

from tdrl.agents import AuxiliaryTerm
from tdrl.agents.registry import get_agent, make_agent
from tdrl.errors import ConfigError
from tdrl.testing.problems import contract_batch, kit_agent, kit_student, kit_teacher

__all__ = ["check_teacher_hook", "check_behaviour", "check_auxiliary_term", "check_student_policy", "HOOK_CHECKS"]


def check_teacher_hook(name: str, **overrides) -> None:
    cls = get_agent(name)
    if cls.needs_teacher:
        try:
            make_agent(name, kit_student(), **overrides)
        except ConfigError as exc:
            assert "teacher=" in str(exc), f"{name}: the error without a teacher must say to pass teacher=: {exc}"
        else:
            raise AssertionError(f"{name}: needs_teacher, yet it was built without a teacher")
    teacher = kit_teacher()
    agent = make_agent(name, kit_student(), teacher=teacher, **overrides)
    assert agent.teacher is teacher, f"{name}: agent.teacher is not the teacher it was built with"
    owned = {p.data_ptr() for p in teacher.model.parameters()}
    state = {v.data_ptr() for v in agent.state_dict().values()} | {p.data_ptr() for p in agent.parameters()}
    assert not owned & state, f"{name}: the teacher's weights are in the agent's parameters or state_dict"
    assert copy.deepcopy(agent).teacher is teacher, f"{name}: a copied agent must share the teacher, not copy it"
    if cls.on_policy:
        preset = cls.trainer_defaults
        assert preset.get("online_every", 0) > 0 and preset.get("online_ratio") == 1.0, (
            f"{name}: on_policy, but its trainer preset {preset} does not train on its own episodes only"
        )


def check_behaviour(name: str, **overrides) -> None:
    agent = kit_agent(name, **overrides)
    vocab = agent.student.vocab_size
    gen = torch.Generator().manual_seed(0)
    student = torch.softmax(3.0 * torch.randn(4, vocab, generator=gen), -1)
    keep = torch.rand(4, vocab, generator=gen) < 0.05
    keep[:, 0] = True  # every row has a set
    teacher = torch.where(keep, torch.rand(4, vocab, generator=gen), torch.zeros(()))
    teacher = teacher / teacher.sum(-1, keepdim=True)
    given = (student.clone(), teacher.clone())
    mu = agent.behaviour(*given)
    assert isinstance(mu, torch.Tensor) and mu.shape == student.shape, f"{name}: behaviour must be [B, V]"
    assert torch.isfinite(mu).all() and (mu >= 0).all(), f"{name}: behaviour has negative or non-finite entries"
    assert torch.allclose(mu.double().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-5), (
        f"{name}: behaviour rows must sum to 1, got {mu.sum(-1).tolist()}"
    )
    assert torch.equal(given[0], student) and torch.equal(given[1], teacher), f"{name}: behaviour changed its inputs"


def _probe(agent, inputs):
    """An auxiliary term linear in the LM head: value sum(W * R), gradient R in W."""
    weight = agent.student.output_weight()
    return (weight * inputs["r"].to(weight.device)).sum(), {"probe/extra": torch.tensor(2.0)}


def check_auxiliary_term(name: str, coef: float = 0.5, **overrides) -> None:
    agent, batch = kit_agent(name, **overrides), contract_batch()
    weight = agent.student.output_weight()
    r = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(weight)
    term = AuxiliaryTerm("probe", coef, {"r": r}, _probe)
    runs = []
    for auxiliary in ([], [term]):
        torch.manual_seed(0)
        agent.zero_grad(set_to_none=True)
        loss, metrics = agent(batch, auxiliary=auxiliary)
        loss.backward()
        runs.append((loss.detach(), metrics, weight.grad.detach().clone()))
    (base, base_metrics, base_grad), (loss, metrics, grad) = runs
    value = float((weight.detach() * r).sum())
    assert "loss/probe" in metrics and "probe/extra" in metrics, f"{name}: forward did not log the term's metrics"
    logged = float(metrics["loss/probe"])
    assert math.isclose(logged, value, rel_tol=1e-5, abs_tol=1e-6), f"{name}: loss/probe {logged} is not {value}"
    assert float(metrics["probe/extra"]) == 2.0, f"{name}: the term's own metric probe/extra is not its value"
    added = float(loss - base)
    assert abs(added - coef * value) <= 1e-4 * max(1.0, abs(value)), (
        f"{name}: the term added {added} to the loss, not coef * value = {coef * value}"
    )
    assert torch.allclose(grad - base_grad, coef * r, atol=1e-5), f"{name}: the term's gradient is not coef * its own"
    taken = next((k[5:] for k in base_metrics if k.startswith("loss/") and re.fullmatch(r"[a-z0-9_]+", k[5:])), None)
    if taken is not None:  # a term may not overwrite one of the agent's own metrics
        try:
            agent(batch, auxiliary=[AuxiliaryTerm(taken, coef, {"r": r}, _probe)])
        except ConfigError:
            pass
        else:
            raise AssertionError(f"{name}: an auxiliary term named {taken!r} overwrote the agent's loss/{taken}")


def check_student_policy(name: str, **overrides) -> None:
    from tdrl.envs import StudentPolicy, TokenGenerationVectorEnv
    from tdrl.envs.policies import teacher_probabilities

    agent, teacher = kit_agent(name, **overrides), kit_teacher()
    env = TokenGenerationVectorEnv(
        teacher, ["hi", "Name three colors.", "Define gravity."], num_envs=3, top_k=16, top_p=0.8, max_new_tokens=2
    )
    obs, _ = env.reset(seed=0)
    out = StudentPolicy(agent, seed=0)(obs)
    assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict), f"{name}: policy must return (a, x)"
    actions, extras = out
    assert np.shape(actions) == (3,) and set(extras) == {"behaviour_logprob", "student_logprob"}, (
        f"{name}: StudentPolicy returned actions {np.shape(actions)} and extras {sorted(extras)}"
    )
    student = agent.student
    with torch.no_grad():
        ids = torch.as_tensor(obs["input_ids"], device=student.device)
        lengths = torch.as_tensor(obs["length"], device=student.device)
        mask = (torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(-1)).long()
        was_training = student.training
        student.eval()
        hidden = student.hidden_states(ids, mask)[torch.arange(3), lengths - 1]
        student.train(was_training)
        probs = torch.softmax(agent.policy_logits(hidden).float().cpu(), -1)
        mu = agent.behaviour(probs, teacher_probabilities(obs, probs.shape[-1]))
    chosen = torch.as_tensor(actions).long().unsqueeze(-1)
    for key, dist in (("behaviour_logprob", mu), ("student_logprob", probs)):
        expected = dist.gather(-1, chosen).squeeze(-1).clamp_min(1e-30).log().numpy()
        assert np.allclose(extras[key], expected, atol=1e-4), f"{name}: {key} {extras[key]} is not {expected}"
    single = StudentPolicy(agent, seed=0)({k: v[0] for k, v in obs.items()})
    assert np.ndim(single[0]) == 0 and {k: np.ndim(v) for k, v in single[1].items()} == dict.fromkeys(extras, 0), (
        f"{name}: on a single observation StudentPolicy must return one action and one value per extra"
    )


HOOK_CHECKS = (check_teacher_hook, check_behaviour, check_auxiliary_term, check_student_policy)
