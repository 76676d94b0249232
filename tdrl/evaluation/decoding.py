"""Decoding for evaluation: the records (:func:`reference_records`), the protocol (:class:`EvalConfig`),
and one decoding pass over the records (:class:`Generation`), which is what every metric of
:data:`tdrl.evaluation.METRICS` reads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from tdrl.agents.config import hp
from tdrl.errors import SEED_RANGE, check_config, check_seeds
from tdrl.models.lm import LM
from tdrl.models.student import Student, support_summary
from tdrl.models.teacher import Teacher

__all__ = ["EvalConfig", "Generation", "decode", "generate_texts", "reference_records", "records_digest"]


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
        source,
        split=split or ("validation" if bundled else None),
        prompt_column=prompt_column,
        response_column=reference_column,
        context_column=context_column,
    )
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
        {
            "prompt": r["prompt"],
            "answer": answer(r),
            "human_reference": r.get("reference") if heldout else None if bundled else r.get("response"),
        }
        for r in ds.to_list()
    ]
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


def records_digest(records: Sequence[dict] | None) -> str | None:
    """A fingerprint of evaluation records (:func:`reference_records`): sha256 over every field of
    every record, in order (prompts, references, answers); None for no records. A resumed run checks
    it, so a run is never validated or tested on two sets of prompts."""
    if records is None:
        return None
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalConfig:
    """How the student is evaluated (each field's range is checked when the config is built).

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

    max_new_tokens: int = hp(64, "response length limit", range=">= 1")
    seeds: list[int] = hp(None, "sampling seeds; at least one, none twice", factory=lambda: [0], range=SEED_RANGE)
    top_p: float = hp(0.8, "nucleus of the student's sampling", range="(0, 1]")
    temperature: float = hp(1.0, "sampling temperature", range="> 0", why="greedy=True decodes greedily")
    top_k: int | None = hp(None, "cap on the sampling candidates (None: no cap)", range=">= 1")
    greedy: bool = hp(False, "decode greedily instead (one pass, seeds ignored)")
    coverage_top_k: int = hp(64, "candidate cap K of the coverage's A_p(s)", range=">= 1")
    coverage_top_p: float = hp(0.8, "nucleus mass p of the coverage's A_p(s)", range="(0, 1]")
    samples: int = hp(3, "examples returned for logging", range=">= 0")
    also_greedy: bool = hp(False, "also decode greedily once (eval/rougeL_greedy)")

    def __post_init__(self):
        check_config(self)
        check_seeds("seeds", self.seeds)


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
    return _generate(LM(model, tokenizer, freeze=False), prompts, config, seed, decode_temperature, batch_size)


def _generate(
    lm: LM, prompts: Sequence[str], config: EvalConfig, seed: int, decode_temperature: float, batch_size: int = 32
) -> list[list[int]]:
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


class Generation:
    """One decoding pass of the student over the evaluation records: what every metric reads.

    Attributes, one entry per record and in its order:
        records: the records (``prompt``, ``reference_response``, optionally ``human_reference``, ``answer``).
        prompts, prompt_ids: the prompts and their token ids (the teacher's prompt encoding).
        responses: the student's response token ids (its EOS included when it ended).
        texts: the responses decoded (EOS and special tokens dropped, stripped).
        greedy: whether this pass decoded greedily; seed: its sampling seed.
        eos_token_id: the tokenizer's EOS.

    Computed on first use (one teacher forward per 16 records; one student forward per record), so a pass
    whose metrics read only texts costs no scoring; read them while the evaluation runs (they score the
    student's weights of that moment):
        teacher_logprob: per response ``[len]``: the teacher's log-likelihood of each student token.
        teacher_sets: per response ``(ids, mask)``, ``[len, K]``: the teacher's A_p(s) at the states that
            chose each token (``EvalConfig.coverage_top_k`` / ``coverage_top_p``).
        inside: per response ``[len]`` bool: the token lies inside that A_p(s).
        entropy, outside_mass, mode_outside: per response ``[len]``, at the same states: the entropy (nats)
            of the student's full-vocabulary sampling distribution ``softmax(logits / T)``, its mass
            outside A_p(s), and whether its most likely token lies outside A_p(s).
    """

    def __init__(
        self,
        records: Sequence[dict],
        prompt_ids: list[list[int]],
        responses: list[list[int]],
        *,
        tokenizer,
        teacher: Teacher,
        student: Student,
        config: EvalConfig,
        temperature: float,
        seed: int,
    ):
        self.records = list(records)
        self.prompts = [r["prompt"] for r in self.records]
        self.prompt_ids = prompt_ids
        self.responses = responses
        self.eos_token_id = tokenizer.eos_token_id
        eos = self.eos_token_id
        self.texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
        self.greedy, self.seed = config.greedy, seed
        self._teacher, self._student, self._config, self._temperature = teacher, student, config, temperature

    @property
    def tokens(self) -> int:
        """Response tokens in all (= the states that chose them)."""
        return sum(len(r) for r in self.responses)

    @cached_property
    def _teacher_view(self) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]], list[Tensor]]:
        teacher, config = self._teacher, self._config
        logprob, sets, inside = [], [], []
        for start in range(0, len(self.responses), 16):
            prompts, responses = self.prompt_ids[start : start + 16], self.responses[start : start + 16]
            rows = [p + r for p, r in zip(prompts, responses)]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), teacher.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            ann = teacher.annotate(ids, mask, top_k=config.coverage_top_k, top_p=config.coverage_top_p)
            for i, response in enumerate(responses):
                lo = len(prompts[i]) - 1
                subset = ann.subset[i, lo : lo + len(response)]
                tokens = torch.tensor(response, dtype=torch.long)
                logprob.append(ann.token_logprob[i, lo : lo + len(response)].cpu())
                sets.append((subset.ids.cpu(), subset.mask.cpu()))
                inside.append(subset.contains(tokens).cpu() if response else torch.zeros(0, dtype=torch.bool))
        return logprob, sets, inside

    @property
    def teacher_logprob(self) -> list[Tensor]:
        return self._teacher_view[0]

    @property
    def teacher_sets(self) -> list[tuple[Tensor, Tensor]]:
        return self._teacher_view[1]

    @property
    def inside(self) -> list[Tensor]:
        return self._teacher_view[2]

    @cached_property
    def _student_view(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        student, scale = self._student, 1.0 / self._temperature
        weight, bias = student.output_weight(), student.output_bias()
        entropy, outside, mode = [], [], []
        with torch.no_grad():
            for prompt, response, (cand, mask) in zip(self.prompt_ids, self.responses, self.teacher_sets):
                if not response:
                    entropy.append(torch.zeros(0))
                    outside.append(torch.zeros(0))
                    mode.append(torch.zeros(0, dtype=torch.bool))
                    continue
                ids = torch.tensor([prompt + response[:-1]], device=student.device)
                hidden = student.hidden_states(ids)[0, len(prompt) - 1 :]
                device = hidden.device
                summary = support_summary(hidden, weight, bias, cand.to(device), mask.to(device), scale=scale)
                entropy.append(summary.entropy.cpu())
                outside.append(summary.outside_mass.cpu())
                mode.append(summary.mode_outside.cpu())
        return entropy, outside, mode

    @property
    def entropy(self) -> list[Tensor]:
        return self._student_view[0]

    @property
    def outside_mass(self) -> list[Tensor]:
        return self._student_view[1]

    @property
    def mode_outside(self) -> list[Tensor]:
        return self._student_view[2]


def decode(
    lm: LM,
    student: Student,
    teacher: Teacher,
    records: Sequence[dict],
    prompt_ids: list[list[int]],
    config: EvalConfig,
    seed: int,
    decode_temperature: float = 1.0,
) -> Generation:
    """One decoding pass of ``lm`` (the student's model, wrapped once; ``student``: the same model as a
    :class:`~tdrl.models.student.Student`) over ``records``: sampled with ``seed``, or greedy."""
    responses = _generate(lm, [r["prompt"] for r in records], config, seed, decode_temperature)
    temperature = config.temperature * decode_temperature
    return Generation(
        records,
        prompt_ids,
        responses,
        tokenizer=lm.tokenizer,
        teacher=teacher,
        student=student,
        config=config,
        temperature=temperature,
        seed=seed,
    )
