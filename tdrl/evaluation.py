"""Evaluation: generate with the student on held-out prompts and score the text.

Metrics (mean and std over sampling seeds; the paper samples with top-p 0.8 and temperature 1 over
5 seeds, MiniLLM with top-p 1.0 - both configurable):

* ``eval/rougeL``: Rouge-L F1 x 100 against the teacher's greedy response (``rouge-score``, Porter
  stemming, the MiniLLM / DistiLLM protocol);
* ``eval/rougeL_reference``: the same against a human reference, for records that have one (a
  ``reference`` column of your data, or the ``dolly`` preset's responses: the paper's protocol);
* ``eval/teacher_nll``: the teacher's negative log-likelihood per token of the student's responses
  (minus the env return per token);
* ``eval/coverage``: fraction of student tokens inside the teacher's A_p(s) (k = 64, p = 0.8);
* ``eval/answer_match``: for records with a short ``answer`` (the bundled prompts' short answers),
  how often it appears in the response (case-insensitive);
* ``eval/length`` (response tokens) and ``eval/terminated`` (fraction that ended with EOS);
* ``eval/entropy``: the entropy (nats) of the student's sampling distribution over the whole vocabulary
  (before the nucleus cut), averaged over the tokens it generated: a method that wins Rouge-L by
  sharpening towards the teacher's mode shows here;
* ``eval/outside_mass``: the student's full-vocabulary mass outside the teacher's A_p(s) (k = 64,
  p = 0.8) at the states of its own samples (the states it decodes at), and ``eval/mode_outside``:
  how often its most likely token lies outside A_p(s) there (a student whose mode is outside A_p(s)
  writes what the teacher would not);
* ``eval/rougeL_greedy`` (with ``also_greedy``): Rouge-L of greedy decoding, one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tdrl.models.lm import LM
from tdrl.models.teacher import Teacher

__all__ = ["EvalConfig", "evaluate", "generate_texts", "reference_records"]


def reference_records(
    teacher: Teacher,
    source="bundled",
    *,
    split: str | None = None,
    n: int | None = None,
    max_new_tokens: int = 48,
    prompt_column: str = "prompt",
    reference_column: str = "reference",
    context_column: str | None = None,
) -> list[dict]:
    """Evaluation records: the first ``n`` prompts of ``source`` (anything
    :func:`tdrl.data.load_source` reads: ``bundled`` (default split: validation; ``heldout``: the
    hand-written prompts, whose references are human answers: scored by Rouge-L, and by
    ``answer_match`` too when at most 3 words long), JSONL / JSON / CSV,
    a ``save_to_disk`` directory, a hub id, the ``dolly`` preset) with the teacher's greedy response
    (``reference_response``, for ``eval/rougeL``), the human reference where the source has one
    (``human_reference``: ``reference_column``, or the preset's response column, for
    ``eval/rougeL_reference``), and the bundled set's short answers (``answer``).

    The teacher's responses are cached under ``$TDRL_CACHE/data``, keyed by a hash of the teacher's
    weights (not its name), the records, ``n`` and ``max_new_tokens``."""
    from tdrl.data import load_source, records_fingerprint
    from tdrl.data.sources import parse_split
    from tdrl.errors import DataError
    from tdrl.integrity import read_json, write_json_atomic
    from tdrl.models.hub import tdrl_cache_dir

    bundled = isinstance(source, str) and source == "bundled"
    ds = load_source(
        source, split=split or ("validation" if bundled else None), prompt_column=prompt_column,
        response_column=reference_column, context_column=context_column,
    )  # fmt: skip
    if n is not None:
        if n < 1:
            raise DataError(f"the number of evaluation prompts must be >= 1, got {n}")
        ds = ds.select(range(min(n, len(ds))))
    # human references: Rouge-L, and answer_match when short
    heldout = bundled and split is not None and parse_split(split)[0] == "heldout"

    def answer(r):
        short = r.get("reference") and len(r["reference"].split()) <= 3
        return r.get("reference") if bundled and (not heldout or short) else None

    rows = [
        {"prompt": r["prompt"], "answer": answer(r),
         "human_reference": r.get("reference") if heldout else None if bundled else r.get("response")}
        for r in ds.to_list()
    ]  # fmt: skip
    key = json.dumps([teacher.weights_fingerprint(), records_fingerprint(ds), max_new_tokens])
    path = tdrl_cache_dir() / "data" / f"references-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        responses = read_json(path, "cached teacher references")
    else:
        ids = []
        for start in range(0, len(rows), 16):
            batch = [r["prompt"] for r in rows[start : start + 16]]
            ids += teacher.generate(batch, max_new_tokens, do_sample=False)
        eos = teacher.eos_token_id
        responses = [
            teacher.tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in ids
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, responses)
    for row, response in zip(rows, responses):
        row["reference_response"] = response
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


@dataclass
class EvalConfig:
    """How the student is evaluated.

    Attributes:
        max_new_tokens: response length limit.
        seeds: sampling seeds; metrics are mean +- std over them (the paper: 5 seeds).
        top_p: nucleus of the student's sampling (the paper: 0.8; MiniLLM: 1.0).
        temperature: sampling temperature (the paper: 1.0).
        top_k: a cap on the sampling candidates (None, the paper's protocol: no cap, the exact nucleus).
        greedy: decode greedily instead (one pass, seeds ignored).
        coverage_top_k / coverage_top_p: the teacher set A_p(s) the coverage is measured against.
        samples: how many (prompt, student, reference) examples to return for logging.
        also_greedy: also decode greedily once and report ``eval/rougeL_greedy``.
    """

    max_new_tokens: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    top_p: float = 0.8
    temperature: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    coverage_top_k: int = 64
    coverage_top_p: float = 0.8
    samples: int = 3
    also_greedy: bool = False


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
    lm = LM(model, tokenizer, freeze=False)
    top_k = lm.vocab_size if config.top_k is None else config.top_k
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
    """Per response: summed teacher log-likelihood, tokens inside A_p(s), length, and the teacher's
    A_p(s) at the states that chose each token (``(ids, mask)``, ``[len, K]``)."""
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
            subset = ann.subset[i, lo:hi]
            inside = subset.contains(tokens).sum().item() if response else 0
            results.append((loglik, inside, len(response), (subset.ids.cpu(), subset.mask.cpu())))
    return results


def _student_states(model, prompt_ids, responses, scale: float, subsets) -> dict[str, float]:
    """Sums over the states that chose each response token: the student's full-vocabulary entropy of
    ``softmax(scale * logits)``, its mass outside the teacher's A_p(s) (``subsets``: per response
    ``(ids, mask)``), whether its mode lies outside A_p(s), and the state count (chunked: no ``[T, V]``
    tensor)."""
    from tdrl.models.student import Student, support_summary

    student = Student(model)
    weight, bias = student.output_weight(), student.output_bias()
    totals = {"entropy": 0.0, "outside_mass": 0.0, "mode_outside": 0.0, "states": 0}
    with torch.no_grad():
        for prompt, response, (cand, mask) in zip(prompt_ids, responses, subsets):
            if not response:
                continue
            ids = torch.tensor([prompt + response[:-1]], device=student.device)
            hidden = student.hidden_states(ids)[0, len(prompt) - 1 :]
            summary = support_summary(hidden, weight, bias, cand.to(hidden.device), mask.to(hidden.device), scale=scale)
            totals["entropy"] += summary.entropy.sum().item()
            totals["outside_mass"] += summary.outside_mass.sum().item()
            totals["mode_outside"] += summary.mode_outside.sum().item()
            totals["states"] += len(response)
    return totals


def evaluate(
    student_model,
    tokenizer,
    teacher: Teacher,
    records: Sequence[dict],
    config: EvalConfig | None = None,
    *,
    decode_temperature: float = 1.0,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Evaluate a student LM on ``records`` (:func:`reference_records`: each with ``prompt`` and
    ``reference_response``, optionally ``human_reference`` and a short ``answer``). Returns (metrics,
    text samples)."""
    from rouge_score import rouge_scorer

    config = config or EvalConfig()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    prompts = [r["prompt"] for r in records]
    prompt_ids = [teacher.encode_prompt(p) for p in prompts]
    was_training = student_model.training
    student_model.eval()
    per_seed: dict[str, list[float]] = {}
    samples: list[dict[str, str]] = []
    eos = tokenizer.eos_token_id
    try:
        for seed in [0] if config.greedy else config.seeds:
            responses = generate_texts(student_model, tokenizer, prompts, config, seed, decode_temperature)
            texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
            rouge = [
                scorer.score(rec["reference_response"], text)["rougeL"].fmeasure * 100
                for rec, text in zip(records, texts)
            ]
            scores = _teacher_scores(teacher, prompt_ids, responses, config)
            tokens = sum(n for _, _, n, _ in scores)
            states = _student_states(
                student_model, prompt_ids, responses, 1.0 / (config.temperature * decode_temperature),
                [subset for *_, subset in scores],
            )  # fmt: skip
            counted = max(states["states"], 1)
            matches = [rec["answer"].lower() in text.lower() for rec, text in zip(records, texts) if rec.get("answer")]
            human = [
                scorer.score(rec["human_reference"], text)["rougeL"].fmeasure * 100
                for rec, text in zip(records, texts)
                if rec.get("human_reference")
            ]
            seed_metrics = {
                "eval/rougeL": float(np.mean(rouge)),
                "eval/teacher_nll": -sum(ll for ll, *_ in scores) / max(tokens, 1),
                "eval/coverage": sum(c for _, c, *_ in scores) / max(tokens, 1),
                "eval/length": tokens / len(responses),
                "eval/terminated": float(np.mean([bool(r) and r[-1] == eos for r in responses])),
                "eval/entropy": states["entropy"] / counted,
                "eval/outside_mass": states["outside_mass"] / counted,
                "eval/mode_outside": states["mode_outside"] / counted,
            }
            if matches:
                seed_metrics["eval/answer_match"] = float(np.mean(matches))
            if human:
                seed_metrics["eval/rougeL_reference"] = float(np.mean(human))
            for key, value in seed_metrics.items():
                per_seed.setdefault(key, []).append(value)
            if not samples:
                samples = [
                    {"prompt": p, "student": s, "teacher": rec["reference_response"]}
                    for p, s, rec in list(zip(prompts, texts, records))[: config.samples]
                ]
        if config.also_greedy and not config.greedy:
            greedy = dataclasses.replace(config, greedy=True)
            responses = generate_texts(student_model, tokenizer, prompts, greedy, 0, decode_temperature)
            texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
            greedy_rouge = [
                scorer.score(rec["reference_response"], text)["rougeL"].fmeasure * 100
                for rec, text in zip(records, texts)
            ]
            per_seed["eval/rougeL_greedy"] = [float(np.mean(greedy_rouge))]
    finally:
        student_model.train(was_training)
    metrics = {}
    for key, values in per_seed.items():
        metrics[key] = float(np.mean(values))
        metrics[f"{key}_std"] = float(np.std(values))
    return metrics, samples
