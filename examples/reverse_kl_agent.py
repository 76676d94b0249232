"""A third-party agent plugged into tdrl from outside the package.

Register it by importing this module (``@register_agent``), or, in your own package, advertise it
in the ``tdrl.agents`` entry-point group so ``tdrl`` finds it without an import::

    # pyproject.toml of your package
    [project.entry-points."tdrl.agents"]
    reverse-kl = "my_package.reverse_kl_agent:ReverseKL"

Then ``tdrl agents`` lists it and ``tdrl train --agent reverse-kl`` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdrl.agents import Agent, AgentConfig, hp, register_agent
from tdrl.agents.gkd import partition_log_probs


@dataclass
class ReverseKLConfig(AgentConfig):
    """Token-level reverse KL to the teacher, the mode-seeking counterpart of KD:

        L = E_s[ sum_{a in A_p(s)} pi_S(a|s) (log pi_S(a|s) - log pi_T(a|s)) + pi_S(out) log(pi_S(out) / pi_T(out)) ],

    both full-vocabulary policies compared on A_p(s) plus one bucket for every token outside it
    (:func:`tdrl.agents.gkd.partition_log_probs`). ``temperature`` divides both policies' logits.

    Metrics: ``loss/reverse_kl``, ``policy/entropy_in_set``.
    """

    temperature: float = hp(1.0, "divides the student's and the teacher's logits before the divergence", range="> 0")


@register_agent("reverse-kl")
class ReverseKL(Agent):
    Config = ReverseKLConfig
    description = "example plug-in: token-level reverse KL to the teacher on A_p(s) + outside"

    def loss(self, t, batch):
        # t: the batch's transitions (one trunk forward, built by Agent.forward)
        pi = self.policy(t, current_only=True, temperature=self.config.temperature)  # normalised over V
        teacher, student, mask = partition_log_probs(t, pi, self.student.vocab_size, self.config.temperature)
        kl = (student.exp() * (student - teacher).masked_fill(~mask, 0.0)).sum(-1).mean()
        metrics = {"loss/reverse_kl": kl.detach(), "policy/entropy_in_set": self.entropy_in_set(pi.logits, pi.mask)}
        return kl, metrics
