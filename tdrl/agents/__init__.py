"""Interchangeable agents behind one contract (:mod:`tdrl.agents.base`).

Built in: ``bc`` (KD / SFT), ``sql``, ``cql``, ``iql`` (Implicit Q-Learning), ``iqlearn`` (Inverse
soft-Q Learning, the paper's "IQL"), ``bd`` (Bellman Distill, the paper's method, with the max in Q
over A_p(s)) and ``bd-released`` (exactly as the authors' code: the max over the whole vocabulary), the on-policy
baselines ``minillm`` and ``gkd``, and ``kd-online`` (word-level KD with the teacher run online over
the full vocabulary: the ecosystem's usual baseline). Third-party
agents register with :func:`register_agent` or the ``tdrl.agents`` entry-point group; the hooks
the trainer reads (``needs_teacher`` / ``teacher=``, ``behaviour``, ``on_policy``, ``trainer_defaults``,
``forward(..., auxiliary=[AuxiliaryTerm, ...])``) are described in :mod:`tdrl.agents.base`.
"""

from tdrl.agents.auxiliary import AuxiliaryTerm
from tdrl.agents.base import ON_POLICY_PRESET, Agent, AgentConfig, Policy, Transitions, hp
from tdrl.agents.bc import BC, BCConfig
from tdrl.agents.gkd import GKD, GKDConfig
from tdrl.agents.iql import IQL, IQLConfig
from tdrl.agents.iqlearn import BD, BDConfig, BDReleased, BDReleasedConfig, IQLearn, IQLearnConfig
from tdrl.agents.minillm import MiniLLM, MiniLLMConfig
from tdrl.agents.online_kd import OnlineKD, OnlineKDConfig
from tdrl.agents.ops import detached, expectile_loss, log1mexp, masked_log_softmax, masked_logsumexp
from tdrl.agents.registry import get_agent, list_agents, make_agent, register_agent
from tdrl.agents.sql import CQL, SQL, CQLConfig, SQLConfig

__all__ = [
    "Agent",
    "AgentConfig",
    "AuxiliaryTerm",
    "ON_POLICY_PRESET",
    "Transitions",
    "Policy",
    "hp",
    "register_agent",
    "get_agent",
    "list_agents",
    "make_agent",
    "masked_logsumexp",
    "masked_log_softmax",
    "log1mexp",
    "detached",
    "expectile_loss",
    "BC",
    "BCConfig",
    "SQL",
    "SQLConfig",
    "CQL",
    "CQLConfig",
    "IQL",
    "IQLConfig",
    "IQLearn",
    "IQLearnConfig",
    "BD",
    "BDConfig",
    "BDReleased",
    "BDReleasedConfig",
    "GKD",
    "GKDConfig",
    "MiniLLM",
    "MiniLLMConfig",
    "OnlineKD",
    "OnlineKDConfig",
]
