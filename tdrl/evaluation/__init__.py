"""Evaluation: generate with the student on held-out prompts and score what it wrote.

One list, :data:`METRICS`, says what is measured: each :class:`Metric` computes one number from one
:class:`~tdrl.evaluation.decoding.Generation` (a decoding pass over the records). Each sampling seed
gives one generation (the paper samples with top-p 0.8 and temperature 1 over 5 seeds; MiniLLM with
top-p 1.0: both in :class:`EvalConfig`); the metrics of those are reported as the mean over seeds and
``*_std``. With ``also_greedy``, one greedy pass gives another, read by the ``*_greedy`` metrics. A
metric that does not apply (no human references, no short answers) is absent. :class:`Evaluator`
wraps the student once and evaluates its current weights (or another model) at every call;
:func:`evaluate` is the one-call form. A metric of your own::

    from tdrl.evaluation import METRICS, Metric, evaluate

    longest = Metric("eval/longest", "the longest response (tokens)", lambda g: max(map(len, g.responses)))
    metrics, samples = evaluate(model, tokenizer, teacher, records, metrics=METRICS + [longest])

The metrics (generated from :data:`METRICS`; ``scripts/config_table.py`` prints them as a table):

"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from tdrl.errors import ConfigError, DataError
from tdrl.evaluation.decoding import EvalConfig, Generation, decode, generate_texts, records_digest, reference_records
from tdrl.evaluation.probe import support_probe
from tdrl.models.lm import LM
from tdrl.models.student import Student
from tdrl.models.teacher import Teacher

__all__ = ["EvalConfig", "Evaluator", "Generation", "METRICS", "Metric", "Column", "evaluate", "reference_records"]
__all__ += ["generate_texts", "records_digest", "rouge_l", "support_probe"]


class Column(NamedTuple):
    """A column of the comparison table (:data:`tdrl.compare.COLUMNS`): its ``header``, and which model's
    value it shows: ``"last"`` / ``"best"`` (the test metrics of the last / the best-validation model) or
    ``"probe"`` (the run summary's end-of-run probe value of the same name without ``eval/``, measured at
    training records' states: :meth:`tdrl.training.Trainer.probe`)."""

    header: str
    model: str = "last"


@dataclass(frozen=True)
class Metric:
    """One evaluation metric.

    Attributes:
        name: its key in the metrics dict and its TensorBoard tag (``eval/...``; ``*_std`` is added).
        description: what it measures, one line (the docs, the table legend and ``scripts/config_table.py``
            show it).
        compute: ``Generation -> float``, or None where it does not apply (the metric is then absent).
        generation: which pass it reads: ``"sampled"`` (every sampling seed, or the one pass of
            ``EvalConfig.greedy``) or ``"greedy"`` (the extra greedy pass of ``also_greedy``).
        columns: where the comparison table shows it (none: not a column).
    """

    name: str
    description: str
    compute: Callable[[Generation], float | None]
    generation: str = "sampled"
    columns: tuple[Column, ...] = ()

    def __post_init__(self):
        if self.generation not in ("sampled", "greedy"):
            raise ConfigError(f"metric {self.name}: generation must be 'sampled' or 'greedy', not {self.generation!r}")
        for column in self.columns:
            if column.model not in ("last", "best", "probe"):
                shown = f"column {column.header!r} shows 'last', 'best' or 'probe', not {column.model!r}"
                raise ConfigError(f"metric {self.name}: {shown}")

    def on_greedy(self, *columns: Column) -> Metric:
        """The same metric on the greedy pass: ``<name>_greedy``."""
        description = f"{self.description}; greedy decoding, one pass"
        return Metric(f"{self.name}_greedy", description, self.compute, "greedy", columns)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, text: str) -> float:
    """Rouge-L F1 x 100 (``rouge-score``, Porter stemming: the MiniLLM / DistiLLM protocol)."""
    return _scorer().score(reference, text)["rougeL"].fmeasure * 100


def _rouge_teacher(g: Generation) -> float:
    return float(np.mean([rouge_l(r["reference_response"], text) for r, text in zip(g.records, g.texts)]))


def _rouge_human(g: Generation) -> float | None:
    scores = [rouge_l(r["human_reference"], text) for r, text in zip(g.records, g.texts) if r.get("human_reference")]
    return float(np.mean(scores)) if scores else None


def _answer_match(g: Generation) -> float | None:
    found = [r["answer"].lower() in text.lower() for r, text in zip(g.records, g.texts) if r.get("answer")]
    return float(np.mean(found)) if found else None


def _per_token(values: Callable[[Generation], list], sign: float = 1.0) -> Callable[[Generation], float]:
    """A sum over every response state of ``values(g)`` (per response ``[len]`` tensors), per token."""
    return lambda g: sign * sum(v.sum().item() for v in values(g)) / max(g.tokens, 1)


ROUGE_L = Metric(
    "eval/rougeL",
    "Rouge-L F1 x 100 (rouge-score, Porter stemming) against the teacher's greedy response",
    _rouge_teacher,
    columns=(Column("Rouge-L last"), Column("Rouge-L best-val model", "best")),
)
ROUGE_L_REFERENCE = Metric(
    "eval/rougeL_reference",
    "Rouge-L F1 x 100 against the human reference (your data's reference column, the dolly preset's responses), "
    "on the records that have one",
    _rouge_human,
    columns=(Column("Rouge-L vs human, last"),),
)
TEACHER_NLL = Metric(
    "eval/teacher_nll",
    "the teacher's negative log-likelihood per token of the student's responses (minus the env return per token)",
    _per_token(lambda g: g.teacher_logprob, -1.0),
    columns=(Column("teacher NLL"),),
)
COVERAGE = Metric(
    "eval/coverage",
    "fraction of the student's tokens inside the teacher's A_p(s) (EvalConfig.coverage_top_k / _top_p: 64, 0.8)",
    _per_token(lambda g: g.inside),
    columns=(Column("coverage"),),
)
ANSWER_MATCH = Metric(
    "eval/answer_match",
    "fraction of responses that contain the record's short answer (case-insensitive), on the records that have one "
    "(the bundled prompts)",
    _answer_match,
)
LENGTH = Metric("eval/length", "response length (tokens)", lambda g: g.tokens / len(g.responses))
TERMINATED = Metric(
    "eval/terminated",
    "fraction of responses that ended with EOS",
    lambda g: float(np.mean([bool(r) and r[-1] == g.eos_token_id for r in g.responses])),
)
ENTROPY = Metric(
    "eval/entropy",
    "entropy (nats) of the student's full-vocabulary sampling distribution (before the nucleus cut) at the states "
    "of its own responses: sharpening towards the teacher's mode shows here",
    _per_token(lambda g: g.entropy),
    columns=(Column("entropy"),),
)
OUTSIDE_MASS = Metric(
    "eval/outside_mass",
    "the student's full-vocabulary mass outside the teacher's A_p(s) at the states of its own responses",
    _per_token(lambda g: g.outside_mass),
    columns=(Column("outside mass"), Column("outside mass, train states", "probe")),
)
MODE_OUTSIDE = Metric(
    "eval/mode_outside",
    "how often the student's most likely token lies outside the teacher's A_p(s) at the states of its own responses",
    _per_token(lambda g: g.mode_outside),
    columns=(Column("mode outside"), Column("mode outside, train states", "probe")),
)

#: The evaluation metrics in report order, which is also the comparison table's column order (its
#: train-state probe columns last). Each sampled metric is reported as the mean over seeds and ``*_std``.
METRICS: list[Metric] = [
    ROUGE_L,
    ROUGE_L_REFERENCE,
    ROUGE_L.on_greedy(Column("greedy Rouge-L"), Column("greedy best-val", "best")),
    ROUGE_L_REFERENCE.on_greedy(),
    TEACHER_NLL,
    COVERAGE,
    ANSWER_MATCH,
    ANSWER_MATCH.on_greedy(),
    LENGTH,
    TERMINATED,
    ENTROPY,
    OUTSIDE_MASS,
    MODE_OUTSIDE,
]

__doc__ += "\n".join(f"* ``{m.name}`` ({m.generation}): {m.description}." for m in METRICS) + "\n"


class Evaluator:
    """Evaluates a student on fixed records with a fixed protocol, its model wrapped once.

    Args:
        model, tokenizer: the student's HF causal LM and tokenizer; :meth:`run` evaluates the model's weights
            of that moment (training may change them between calls).
        teacher: scores the responses (NLL, A_p(s)).
        records: :func:`reference_records` (each ``prompt`` and ``reference_response``; optionally
            ``human_reference`` and a short ``answer``).
        config: the decoding protocol (default :class:`EvalConfig`).
        decode_temperature: the agent's decoding temperature, multiplied into ``config.temperature``.
        metrics: what to measure (default :data:`METRICS`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        teacher: Teacher,
        records: Sequence[dict],
        config: EvalConfig | None = None,
        *,
        decode_temperature: float = 1.0,
        metrics: Sequence[Metric] | None = None,
    ):
        self.records = list(records)
        if not self.records:
            raise DataError("no evaluation records: pass at least one (tdrl.evaluation.reference_records)")
        missing = [i for i, r in enumerate(self.records) if "prompt" not in r or "reference_response" not in r]
        if missing:
            raise DataError(
                f"evaluation records {missing[:5]} lack 'prompt' or 'reference_response': build them with "
                "tdrl.evaluation.reference_records"
            )
        self.metrics = list(METRICS if metrics is None else metrics)
        names = [m.name for m in self.metrics]
        if len(set(names)) < len(names):
            raise ConfigError(f"metric names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        self.model, self.tokenizer, self.teacher = model, tokenizer, teacher
        self.config = config or EvalConfig()
        self.decode_temperature = decode_temperature
        self.prompt_ids = [teacher.encode_prompt(r["prompt"]) for r in self.records]
        self._wrapped = self._wrap(model)

    def _wrap(self, model) -> tuple[LM, Student]:
        return LM(model, self.tokenizer, freeze=False), Student(model)

    def run(
        self, model=None, seeds: Sequence[int] | None = None, also_greedy: bool | None = None
    ) -> tuple[dict[str, float], list[dict[str, str]]]:
        """Evaluate ``model`` (default: the student given at construction, its current weights; another, e.g.
        the reloaded ``best/`` model, is wrapped for this call) with ``seeds`` and ``also_greedy`` (default:
        the config's). Returns (metrics: each mean and ``*_std`` over seeds; up to ``config.samples``
        ``{prompt, student, teacher}`` texts of the first pass)."""
        lm, student = self._wrapped if model is None or model is self.model else self._wrap(model)
        config = self.config
        seeds = list(config.seeds if seeds is None else seeds)
        also_greedy = config.also_greedy if also_greedy is None else also_greedy
        sampled = [m for m in self.metrics if m.generation == "sampled"]
        greedy = [m for m in self.metrics if m.generation == "greedy"]
        passes = [(config, 0, sampled)] if config.greedy else [(config, seed, sampled) for seed in seeds]
        if also_greedy and not config.greedy and greedy:
            passes.append((dataclasses.replace(config, greedy=True), 0, greedy))
        per_seed: dict[str, list[float]] = {}
        samples: list[dict[str, str]] = []
        was_training = lm.model.training
        lm.model.eval()
        try:
            for pass_config, seed, metrics in passes:
                generation = decode(
                    lm, student, self.teacher, self.records, self.prompt_ids, pass_config, seed, self.decode_temperature
                )
                for metric in metrics:
                    value = metric.compute(generation)
                    if value is not None:
                        per_seed.setdefault(metric.name, []).append(float(value))
                if not samples:
                    shown = list(zip(self.records, generation.texts))[: config.samples]
                    samples = [
                        {"prompt": r["prompt"], "student": t, "teacher": r["reference_response"]} for r, t in shown
                    ]
        finally:
            lm.model.train(was_training)
        out = {}
        for key, values in per_seed.items():
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values))
        return out, samples


def evaluate(
    student_model,
    tokenizer,
    teacher: Teacher,
    records: Sequence[dict],
    config: EvalConfig | None = None,
    *,
    decode_temperature: float = 1.0,
    metrics: Sequence[Metric] | None = None,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Evaluate a student LM on ``records`` once: ``Evaluator(...).run()``. Returns (metrics, text samples)."""
    evaluator = Evaluator(
        student_model, tokenizer, teacher, records, config, decode_temperature=decode_temperature, metrics=metrics
    )
    return evaluator.run()
