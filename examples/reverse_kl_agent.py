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

from tdrl.agents import Agent, AgentConfig, masked_log_softmax, register_agent


@dataclass
class ReverseKLConfig(AgentConfig):
    """Token-level reverse KL to the teacher on A_p(s), the mode-seeking counterpart of KD:

        L = E_s[ sum_{a in A_p(s)} pi_S^p(a|s) (log pi_S^p(a|s) - log pi_T^p(a|s)) ],

    both policies renormalised on A_p(s). ``temperature`` divides the student logits.

    Metrics: ``loss/reverse_kl``, ``policy/entropy_in_set``.
    """

    temperature: float = 1.0


@register_agent("reverse-kl")
class ReverseKL(Agent):
    Config = ReverseKLConfig
    description = "example plug-in: token-level reverse KL to the teacher on A_p(s)"

    def loss(self, batch):
        t = self.transitions(batch)
        mask = t.cand_mask[t.cur]
        logits = self.student.subset_logits(t.hidden[t.cur], t.cand_ids[t.cur]) / self.config.temperature
        student = masked_log_softmax(logits, mask)
        teacher = masked_log_softmax(t.cand_logprobs[t.cur], mask)
        kl = (student.exp() * (student - teacher).masked_fill(~mask, 0.0)).sum(-1).mean()
        metrics = {"loss/reverse_kl": kl.item(), "policy/entropy_in_set": self.entropy_in_set(logits, mask).item()}
        return kl, metrics
