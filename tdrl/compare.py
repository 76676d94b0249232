"""The compare harness: the same data, budget and seeds for every agent; one table, one plot.

``tdrl compare --agents bc,sql,iql,iqlearn,cql,bd --seeds 3 --steps N`` writes into ``--out``:

* ``runs/<agent>-seed<k>/``: each run's TensorBoard events, checkpoints, ``best/`` and summary;
  ``tensorboard --logdir <out>/runs`` shows them all (HParams tab included);
* ``results.csv``: one row per run: test metrics of the last and of the best-validation model,
  the mass outside A_p(s), wall and training time;
* ``results.md``: mean +- std over seeds per agent (CORL style), the starting student as a reference
  row, and which differences exceed the seeds' spread. Every figure is measured on the **test**
  prompts (``--test-data``); the validation score that picked the best model is never reported as
  its quality (it is biased upward by the very selection);
* ``eval_curves.png``: validation Rouge-L against step per agent (mean over seeds).

Agent specs: a registered name, ``name:key=value,...`` for settings, and the aliases ``kd``
(= ``bc:mode=kd``), ``sft`` / ``seqkd`` (= ``bc:mode=sft``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from tdrl.errors import ConfigError
from tdrl.models import load_teacher
from tdrl.training import RunSummary, TrainConfig
from tdrl.training.config import resolve_device

__all__ = ["parse_agent_spec", "split_agent_specs", "compare", "results_table", "separations", "start_row", "COLUMNS"]

ALIASES = {"kd": "bc:mode=kd", "sft": "bc:mode=sft", "seqkd": "bc:mode=sft"}


def _test(which: str, key: str):
    return lambda s: s.test_metric(which, key)


#: The table's columns: (header, getter over a run summary). Rouge-L of the last and of the
#: best-validation model; the rest of the last model; the outside mass from the end-of-run probe.
COLUMNS = (
    ("Rouge-L last", _test("last", "eval/rougeL")),
    ("Rouge-L best-val model", _test("best", "eval/rougeL")),
    ("Rouge-L vs human, last", _test("last", "eval/rougeL_reference")),
    ("greedy Rouge-L", _test("last", "eval/rougeL_greedy")),
    ("greedy best-val", _test("best", "eval/rougeL_greedy")),
    ("teacher NLL", _test("last", "eval/teacher_nll")),
    ("coverage", _test("last", "eval/coverage")),
    ("entropy", _test("last", "eval/entropy")),
    ("outside mass", _test("last", "eval/outside_mass")),
    ("mode outside", _test("last", "eval/mode_outside")),
    ("outside mass, train states", lambda s: s.probe.get("outside_mass", float("nan"))),
    ("mode outside, train states", lambda s: s.probe.get("mode_outside", float("nan"))),
)


def split_agent_specs(text: str) -> list[str]:
    """``"kd,iqlearn:chi2=false,alpha=0.2,bd"`` -> ``["kd", "iqlearn:chi2=false,alpha=0.2", "bd"]``: a comma
    starts a new spec unless what follows is another ``key=value`` of the previous one."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if specs and ":" in specs[-1] and "=" in part and ":" not in part:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def parse_agent_spec(spec: str) -> tuple[str, str, str]:
    """``"sql:alpha=0.5"`` -> (label, agent name, agent_args)."""
    label = spec.strip()
    resolved = ALIASES.get(label, label)
    name, _, args = resolved.partition(":")
    from tdrl.agents import get_agent

    get_agent(name)
    return re.sub(r"[^\w.=-]+", "_", label), name, args


def start_row(
    base: TrainConfig, teacher, progress: bool = False, label: str = "start", seeds: list[int] | tuple[int, ...] = (0,)
) -> list[RunSummary]:
    """The starting student itself (``base.student``, untrained) under the same test protocol and
    outside-mass probe as every run: the reference rows of a comparison, one per entry of ``seeds``
    (a comparison passes its training seeds), each sampled with as many test seeds as a run but
    disjoint ones (row i: the test seeds + 1000 i), so the start has a spread too: the test prompts'
    sampling noise alone, which a single evaluation would hide."""
    from tdrl.training.build import build_trainer

    config = base.replace(agent="bc", out=str(Path(base.out) / "runs" / "start"))
    trainer = build_trainer(config, teacher=teacher, progress=progress)
    probe = trainer.probe()
    rows: list[RunSummary] = []
    for i, seed in enumerate(seeds):
        test = None
        if base.test.prompts:
            test = trainer.test(greedy=i == 0, seeds=[s + 1000 * i for s in config.test_seeds])
            if i:  # greedy decoding does not depend on the seed: one pass serves every row
                greedy = {k: v for k, v in rows[0].test.last.items() if k.startswith("eval/rougeL_greedy")}
                test.last.update(greedy)
                test.best.update(greedy)
        rows.append(RunSummary(agent=label, label=label, seed=seed, steps=0, test=test, probe=dict(probe)))
    return rows


def run_specs(base: TrainConfig, agents: list[str], seeds: list[int], out: Path) -> list[tuple[str, TrainConfig]]:
    """(label, config) of every (agent spec, seed), all validated before anything trains: an unknown
    agent or setting, or two specs with one label, is an error here, not after the first runs."""
    runs, labels = [], set()
    for spec in agents:
        label, name, args = parse_agent_spec(spec)
        if label in labels:
            raise ConfigError(f"agent spec {spec!r} is given twice: each spec trains once per seed")
        labels.add(label)
        for seed in seeds:
            config = base.replace(
                agent=name, agent_config=args or None, seed=seed, out=str(out / "runs" / f"{label}-seed{seed}")
            )
            runs.append((label, config))
    return runs


def compare(
    agents: list[str],
    seeds: list[int],
    base: TrainConfig,
    out: str | Path,
    progress: bool = True,
    start: str | None = "start",
    teacher=None,
) -> list[RunSummary]:
    """Train every (agent, seed) with ``base``'s settings; write results.{csv,md} and the plot. Unless
    ``start`` is None, the starting student is evaluated as the reference row labelled ``start`` (sampled once
    per seed: :func:`start_row`). ``teacher``: an already loaded teacher (else ``base.teacher`` is loaded)."""
    from tdrl.training.build import build_trainer

    out = Path(out)
    if not agents:
        raise ConfigError("compare needs at least one agent")
    if not seeds:
        raise ConfigError("compare needs at least one seed (--seeds N with N >= 1)")
    runs = run_specs(base, agents, seeds, out)
    teacher = teacher or load_teacher(base.teacher, dtype=base.teacher_dtype, device=resolve_device(base.device))
    summaries = start_row(base.replace(out=str(out)), teacher, progress, start, seeds) if start else []
    for label, config in runs:
        summary = build_trainer(config, teacher=teacher, progress=progress).train()
        summary.label = label
        summaries.append(summary)
    write_results(summaries, out)
    return summaries


def write_results(summaries: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["agent", "seed", "steps", "wall_time_s", "train_time_s", "best_step"]
                        + [name for name, _ in COLUMNS])  # fmt: skip
        for s in summaries:
            best_step = s.test.best_step if s.test else None
            writer.writerow(
                [s.label, s.seed, s.steps, f"{s.wall_time_s:.1f}", f"{s.train_time_s:.1f}", best_step]
                + [f"{get(s):.4f}" for _, get in COLUMNS]
            )
    (out / "results.md").write_text(results_table(summaries))
    _plot(summaries, out / "eval_curves.png")


def _groups(summaries: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s.label, []).append(s)
    return groups


def _cell(values: np.ndarray) -> str:
    if not np.isfinite(values).any():
        return "-"
    values = values[np.isfinite(values)]
    return f"{values.mean():.2f}" if len(values) == 1 else f"{values.mean():.2f} ± {values.std():.2f}"


def separations(summaries: list[dict], column: str = "Rouge-L last") -> list[str]:
    """Pairs of agents whose mean ``column`` differs by more than the sum of their standard deviations
    over seeds, largest gap first. A group with fewer than two finite values has no spread and takes no
    part: one seed's difference is no evidence of a separation."""
    get = dict(COLUMNS)[column]
    stats = {}
    for label, runs in _groups(summaries).items():
        values = np.array([get(r) for r in runs], dtype=float)
        if np.isfinite(values).sum() >= 2:
            stats[label] = (float(np.nanmean(values)), float(np.nanstd(values)))
    labels = list(stats)
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            (ma, sa), (mb, sb) = stats[a], stats[b]
            if abs(ma - mb) > sa + sb:
                hi, lo = (a, b) if ma > mb else (b, a)
                pairs.append((abs(ma - mb), f"{hi} > {lo} ({stats[hi][0]:.2f} vs {stats[lo][0]:.2f})"))
    return [text for _, text in sorted(pairs, reverse=True)]


def results_table(summaries: list[dict]) -> str:
    """Markdown: per agent, mean ± std over seeds of each test column, the separations, a legend."""
    shown = [(name, get) for name, get in COLUMNS if any(np.isfinite(get(s)) for s in summaries)]
    header = ["agent", "seeds", "train s/run"] + [name for name, _ in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in _groups(summaries).items():
        cells = [label, str(len(runs)), f"{np.mean([r.train_time_s for r in runs]):.0f}"]
        cells += [_cell(np.array([get(r) for r in runs], dtype=float)) for _, get in shown]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = separations(summaries)
    lines += [
        "",
        "Beyond the seed spread (test Rouge-L of the last model; the difference of means exceeds the sum of the "
        "standard deviations; rows of one seed take no part): " + ("; ".join(pairs) if pairs else "no pair") + ".",
        "",
        "All figures on the test prompts, mean ± std over seeds. Rouge-L: F1 x 100 against the teacher's greedy "
        "response (vs human: against the data's reference answers, where it has them); 'best-val model' = the "
        "checkpoint with the best validation Rouge-L, scored on the test prompts. greedy Rouge-L: greedy decoding of "
        "the last (best-val: the best-validation) model; teacher NLL: per token of the student's samples; coverage: "
        "fraction of sampled tokens inside the teacher's A_p(s); entropy: of the student's full-vocabulary sampling "
        "distribution (nats); outside mass: the decoding policy's mass outside the teacher's A_p(s) at the states "
        "of its own test samples; mode outside: how often its most likely token lies outside A_p(s) there; the "
        "same two on 64 training records' states (the probe), 'train states'. "
        "The first row is the student before any training, sampled once per seed (its spread is the test "
        "sampling's noise alone).",
    ]
    return "\n".join(lines) + "\n"


def _plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, group in _groups(summaries).items():
        runs = [s for s in group if s.history]
        if not runs:
            continue
        steps = [h.step for h in runs[0].history]
        curves = [[h.metrics["eval/rougeL"] for h in r.history][: len(steps)] for r in runs]
        width = min(len(c) for c in curves)
        ax.plot(steps[:width], np.mean([c[:width] for c in curves], axis=0), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation Rouge-L")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
