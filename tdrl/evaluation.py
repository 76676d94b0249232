"""Evaluation: generate with the student on held-out prompts and score the text.

Metrics (mean and std over sampling seeds; the paper samples with top-p 0.8 and temperature 1 over
5 seeds, MiniLLM with top-p 1.0 - both configurable):

* ``eval/rougeL``: Rouge-L F1 x 100 against the reference response (``rouge-score``, Porter stemming,
  the MiniLLM / DistiLLM protocol);
* ``eval/teacher_nll``: the teacher's negative log-likelihood per token of the student's responses
  (minus the env return per token);
* ``eval/coverage``: fraction of student tokens inside the teacher's A_p(s) (k = 64, p = 0.8);
* ``eval/answer_match``: for records with a short ``reference`` answer, how often it appears in the
  response (case-insensitive);
* ``eval/length`` (response tokens) and ``eval/terminated`` (fraction that ended with EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tdrl.teachers import Teacher

__all__ = ["EvalConfig", "evaluate", "generate_texts"]


@dataclass
class EvalConfig:
    """How the student is evaluated.

    Attributes:
        max_new_tokens: response length limit.
        seeds: sampling seeds; metrics are mean +- std over them (the paper: 5 seeds).
        top_p: nucleus of the student's sampling (the paper: 0.8; MiniLLM: 1.0).
        temperature: sampling temperature (the paper: 1.0).
        greedy: decode greedily instead (one pass, seeds ignored).
        coverage_top_k / coverage_top_p: the teacher set A_p(s) the coverage is measured against.
        samples: how many (prompt, student, reference) examples to return for logging.
    """

    max_new_tokens: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    top_p: float = 0.8
    temperature: float = 1.0
    greedy: bool = False
    coverage_top_k: int = 64
    coverage_top_p: float = 0.8
    samples: int = 3


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    config: EvalConfig,
    seed: int,
    decode_temperature: float = 1.0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Student responses (token ids) for ``prompts``, KV-cached, seeded."""
    lm = Teacher(model, tokenizer, freeze=False)
    vocab = lm.vocab_size
    top_k = vocab if config.top_p >= 1.0 else min(256, vocab)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out += lm.generate(
            list(prompts[start : start + batch_size]),
            config.max_new_tokens,
            do_sample=not config.greedy,
            temperature=config.temperature * decode_temperature,
            top_k=top_k,
            top_p=config.top_p,
            seed=seed * 7919 + start,
        )
    return out


def _teacher_scores(teacher: Teacher, prompt_ids: list[list[int]], responses: list[list[int]], config: EvalConfig):
    """Per response: summed teacher log-likelihood, tokens inside A_p(s), and length."""
    results = []
    for start in range(0, len(responses), 16):
        rows = [p + r for p, r in zip(prompt_ids[start : start + 16], responses[start : start + 16])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), teacher.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ann = teacher.annotate(ids, mask, top_k=config.coverage_top_k, top_p=config.coverage_top_p)
        for i, response in enumerate(responses[start : start + 16]):
            n_prompt = len(prompt_ids[start + i])
            lo, hi = n_prompt - 1, n_prompt - 1 + len(response)
            tokens = torch.tensor(response, dtype=torch.long)
            loglik = ann.token_logprob[i, lo:hi].sum().item()
            inside = ann.subset[i, lo:hi].contains(tokens).sum().item() if response else 0
            results.append((loglik, inside, len(response)))
    return results


def evaluate(
    student_model,
    tokenizer,
    teacher: Teacher,
    records: Sequence[dict],
    config: EvalConfig | None = None,
    *,
    decode_temperature: float = 1.0,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Evaluate a student LM on ``records`` (each with ``prompt`` and ``reference_response``, and
    optionally a short ``reference``). Returns (metrics, text samples)."""
    from rouge_score import rouge_scorer

    config = config or EvalConfig()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    prompts = [r["prompt"] for r in records]
    prompt_ids = [teacher.encode_prompt(p) for p in prompts]
    was_training = student_model.training
    student_model.eval()
    per_seed: dict[str, list[float]] = {}
    samples: list[dict[str, str]] = []
    try:
        for seed in [0] if config.greedy else config.seeds:
            responses = generate_texts(student_model, tokenizer, prompts, config, seed, decode_temperature)
            eos = tokenizer.eos_token_id
            texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
            rouge = [
                scorer.score(rec["reference_response"], text)["rougeL"].fmeasure * 100
                for rec, text in zip(records, texts)
            ]
            scores = _teacher_scores(teacher, prompt_ids, responses, config)
            tokens = sum(n for _, _, n in scores)
            matches = [
                rec["reference"].lower() in text.lower() for rec, text in zip(records, texts) if rec.get("reference")
            ]
            seed_metrics = {
                "eval/rougeL": float(np.mean(rouge)),
                "eval/teacher_nll": -sum(ll for ll, _, _ in scores) / max(tokens, 1),
                "eval/coverage": sum(c for _, c, _ in scores) / max(tokens, 1),
                "eval/length": tokens / len(responses),
                "eval/terminated": float(np.mean([bool(r) and r[-1] == eos for r in responses])),
            }
            if matches:
                seed_metrics["eval/answer_match"] = float(np.mean(matches))
            for key, value in seed_metrics.items():
                per_seed.setdefault(key, []).append(value)
            if not samples:
                samples = [
                    {"prompt": p, "student": s, "teacher": rec["reference_response"]}
                    for p, s, rec in list(zip(prompts, texts, records))[: config.samples]
                ]
    finally:
        student_model.train(was_training)
    metrics = {}
    for key, values in per_seed.items():
        metrics[key] = float(np.mean(values))
        metrics[f"{key}_std"] = float(np.std(values))
    return metrics, samples
