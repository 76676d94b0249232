"""Word-level KD with the teacher run online over the full vocabulary: the baseline tdrl is measured against.

This is what distillation code commonly does today (TRL's ``GKDTrainer`` with ``lmbda=0`` and
``beta=0``, i.e. no student samples and the forward KL): every step runs the teacher on the batch
and compares ``[N, V]`` teacher and student distributions over the whole vocabulary. It reads only
the tokens of the data (no cached candidates), so it trains on any annotation cache, but each step
pays one teacher forward and two full-vocabulary softmaxes. The benchmarks (``benchmarks/``) use it
as the baseline of the sparse path's speed, memory and time-to-quality claims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdrl.agents.base import Agent, AgentConfig, hp
from tdrl.agents.ops import detached
from tdrl.agents.registry import register_agent


@dataclass
class OnlineKDConfig(AgentConfig):
    """Forward KL to the teacher over the whole vocabulary, teacher run in the loss:

        L = E_s[ sum_{a in V} pi_T(a|s) (log pi_T(a|s) - log pi_S(a|s)) ],

    both distributions at ``temperature`` (1 = the plain KL). ``restrict``, ``gamma`` and ``top_p``
    are ignored: nothing here uses the teacher's set A_p(s).

    Needs the teacher (``needs_teacher = True``): build it with ``teacher=`` (``make_agent("kd-online",
    student, teacher=teacher)``; ``tdrl train`` passes it); the teacher is not part of the agent's state.

    Metrics: ``loss/kd`` (= ``policy/kl_teacher``, the full-vocabulary KL), ``policy/nll_data``.
    """

    temperature: float = hp(1.0, "temperature dividing the teacher's and the student's logits", range="> 0")


@register_agent("kd-online")
class OnlineKD(Agent):
    Config = OnlineKDConfig
    description = "baseline: word-level KD with the teacher run online, full-vocabulary forward KL (TRL GKD, lambda=0)"
    needs_teacher = True

    def loss(self, t, batch):
        teacher = self.teacher
        tau = self.config.temperature
        device = self.student.device
        input_ids = batch["input_ids"].to(device)
        sel = batch["response_mask"].to(device).bool()
        with torch.no_grad():
            logits = teacher.logits(input_ids, batch["attention_mask"])  # on the device of the teacher's head
            teacher_logits = logits[sel.to(logits.device)]
        teacher_logp = torch.log_softmax(teacher_logits.to(device).float() / tau, -1)
        student_logp = torch.log_softmax(self.student.full_logits(t.hidden[t.cur]).float() / tau, -1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        loss = kl.mean()
        nll = -student_logp.gather(-1, t.actions.unsqueeze(-1)).squeeze(-1)
        metrics = {"loss/kd": loss, "policy/kl_teacher": loss, "policy/nll_data": nll.mean()}
        return loss, detached(metrics)
