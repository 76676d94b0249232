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
* ``eval_curves.png``: per agent against step, the mean over seeds and the min..max band: validation
  Rouge-L (left) and the student's entropy on the validation samples (right).

Agent specs: a registered name, ``name:key=value,...`` for settings, and the aliases ``kd``
(= ``bc:mode=kd``), ``sft`` / ``seqkd`` (= ``bc:mode=sft``).
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np

from tdrl.errors import ConfigError
from tdrl.evaluation import METRICS
from tdrl.integrity import DirectoryLock, read_json, write_json_atomic
from tdrl.models import load_teacher
from tdrl.training import RunSummary, TrainConfig
from tdrl.training.config import resolve_device

__all__ = [
    "parse_agent_spec",
    "split_agent_specs",
    "compare",
    "results_table",
    "separations",
    "start_row",
    "written_by",
    "COLUMNS",
    "COMPARISON_FILE",
]

#: What a comparison writes into its output directory (beside ``runs/``).
RESULTS_CSV, RESULTS_MD, CURVES_PNG = "results.csv", "results.md", "eval_curves.png"

ALIASES = {"kd": "bc:mode=kd", "sft": "bc:mode=sft", "seqkd": "bc:mode=sft"}


def _metric(summary: RunSummary, which: str, key: str):
    """The one place compare reads a run summary. ``which``: ``"last"`` / ``"best"`` (a test metric of the
    last / the best-validation model; NaN when absent), ``"probe"`` (a value of the end-of-run probe at
    training states: ``outside_mass``, ``mode_outside``; NaN when absent), ``"run"`` (a plain field:
    ``label``, ``seed``, ``steps``, ``wall_time_s``, ``train_time_s``, ``best_step``), or ``"history"``
    (the validation curve of metric ``key``: ``{step: value}``, NaN where an evaluation lacks it)."""
    nan = float("nan")
    if which in ("last", "best"):
        return summary.test_metric(which, key)
    if which == "probe":
        return summary.probe.get(key, nan)
    if which == "run":
        if key == "best_step":
            return summary.test.best_step if summary.test else None
        return getattr(summary, key)
    if which == "history":
        return {h.step: h.metrics.get(key, nan) for h in summary.history}
    raise ValueError(f"unknown summary part {which!r}")


def _table_columns(metrics) -> list[tuple[str, str, str]]:
    """(header, which, key) of every table column the metrics declare: the test columns in the metrics'
    order, then the train-state probe columns."""
    columns = [(c.header, c.model, m.name) for m in metrics for c in m.columns]
    columns = [c for c in columns if c[1] != "probe"] + [c for c in columns if c[1] == "probe"]
    return [
        (header, which, name.removeprefix("eval/") if which == "probe" else name) for header, which, name in columns
    ]


#: The table's columns: (header, getter over a run summary), from :data:`tdrl.evaluation.METRICS` (each
#: metric's ``columns``): Rouge-L of the last and of the best-validation model, ...; the outside mass and
#: mode outside of the end-of-run probe last.
COLUMNS = tuple(
    (header, lambda s, which=which, key=key: _metric(s, which, key)) for header, which, key in _table_columns(METRICS)
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
                greedy = {k: v for k, v in rows[0].test.last.items() if "_greedy" in k}
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
    *,
    command: str = "compare",
    locked: bool = False,
) -> list[RunSummary]:
    """Train every (agent, seed) with ``base``'s settings; write results.{csv,md} and the plot. Unless
    ``start`` is None, the starting student is evaluated as the reference row labelled ``start`` (sampled once
    per seed: :func:`start_row`). ``teacher``: an already loaded teacher (else ``base.teacher`` is loaded).

    ``out`` is locked for the whole comparison (a second comparison into it is refused; ``locked``: the
    caller holds the lock) and records who wrote it (:data:`COMPARISON_FILE`, ``command``). A comparison
    already there is replaced only with ``base.overwrite``, or when ``command`` is ``"demo"`` and so was
    the one there (a second ``tdrl demo`` replaces the first one's runs, never a ``tdrl compare``'s)."""
    out = Path(out)
    if not agents:
        raise ConfigError("compare needs at least one agent")
    if not seeds:
        raise ConfigError("compare needs at least one seed (--seeds N with N >= 1)")
    if len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**32 for s in seeds):  # training seeds, as --seed
        raise ConfigError(f"compare's seeds must be distinct and lie in [0, 2**32), got {seeds}")
    runs = run_specs(base, agents, seeds, out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a directory")
    if locked:
        return _compare_locked(runs, seeds, base, out, progress, start, teacher, command)
    with DirectoryLock(out, "comparison directory"):
        return _compare_locked(runs, seeds, base, out, progress, start, teacher, command)


#: The comparison's record in its directory: who wrote it (``compare`` or ``demo``), the specs and seeds.
COMPARISON_FILE = "tdrl-comparison.json"


def written_by(out: Path) -> str | None:
    """Which command wrote the comparison in ``out`` (``"compare"``, ``"demo"``), or None if there is none.
    A comparison from before :data:`COMPARISON_FILE` counts as a demo's when it has the demo's warm start
    and start row, else as a compare's."""
    record = out / COMPARISON_FILE
    if record.is_file():
        return str(read_json(record, "comparison record").get("command", "compare"))
    if not (out / RESULTS_MD).exists() and not (out / RESULTS_CSV).exists():
        return None
    if (out / "warm-start").is_dir() and (out / RESULTS_CSV).is_file():
        with (out / RESULTS_CSV).open(newline="") as fh:
            if any(row.get("agent") == "warm start" for row in csv.DictReader(fh)):
                return "demo"
    return "compare"


def _compare_locked(runs, seeds, base, out: Path, progress, start, teacher, command) -> list[RunSummary]:
    from tdrl.training.build import build_trainer

    there = written_by(out)
    replace = base.overwrite or (command == "demo" and there == "demo")
    if there is not None and not replace:
        advice = " (a demo replaces only an earlier demo's runs)" if command == "demo" else ""
        raise ConfigError(
            f"{out} already holds a `tdrl {there}` comparison: choose another --out, or --overwrite to replace "
            f"it{advice}"
        )
    if (out / "runs").is_symlink():
        raise ConfigError(f"{out / 'runs'} is a symbolic link: tdrl never writes through links; choose another --out")
    if replace and (out / RESULTS_CSV).is_file():  # the comparison replaced: the runs it listed go too
        from tdrl.training.checkpoints import RUN_MARKER

        keep = {Path(config.out).name for _, config in runs}
        with (out / RESULTS_CSV).open(newline="") as fh:
            listed = {f"{row['agent']}-seed{row['seed']}" for row in csv.DictReader(fh)}
        for name in sorted(listed - keep):
            old = out / "runs" / name
            if old.is_dir() and not old.is_symlink() and (old / RUN_MARKER).is_file():
                shutil.rmtree(old)
    for name in (RESULTS_MD, RESULTS_CSV, CURVES_PNG):  # no table of the replaced comparison outlives it
        if (out / name).is_file() and not (out / name).is_symlink():
            (out / name).unlink()
    specs = list(dict.fromkeys(label for label, _ in runs))
    record = {"command": command, "agents": specs, "seeds": list(seeds), "complete": False}
    write_json_atomic(out / COMPARISON_FILE, record)
    runs = [(label, config.replace(overwrite=True) if replace else config) for label, config in runs]
    teacher = teacher or load_teacher(
        base.teacher, dtype=base.teacher_dtype, device=resolve_device(base.device), device_map=base.teacher_device_map
    )
    summaries = start_row(base.replace(out=str(out)), teacher, progress, start, seeds) if start else []
    for label, config in runs:
        summary = build_trainer(config, teacher=teacher, progress=progress).train()
        summary.label = label
        summaries.append(summary)
    write_results(summaries, out)
    write_json_atomic(out / COMPARISON_FILE, {**record, "complete": True})
    return summaries


def write_results(summaries: list[RunSummary], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / RESULTS_CSV).open("w", newline="") as fh:
        writer = csv.writer(fh)
        fields = ["label", "seed", "steps", "wall_time_s", "train_time_s", "best_step"]
        writer.writerow(["agent", *fields[1:]] + [name for name, _ in COLUMNS])
        for s in summaries:
            label, seed, steps, wall, train, best_step = (_metric(s, "run", f) for f in fields)
            row = [label, seed, steps, f"{wall:.1f}", f"{train:.1f}", best_step]
            writer.writerow(row + [f"{get(s):.4f}" for _, get in COLUMNS])
    (out / RESULTS_MD).write_text(results_table(summaries))
    _plot(summaries, out / CURVES_PNG)


def _groups(summaries: list[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(_metric(s, "run", "label"), []).append(s)
    return groups


def _cell(values: np.ndarray) -> str:
    if not np.isfinite(values).any():
        return "-"
    values = values[np.isfinite(values)]
    return f"{values.mean():.2f}" if len(values) == 1 else f"{values.mean():.2f} ± {values.std():.2f}"


def separations(summaries: list[RunSummary], column: str = "Rouge-L last") -> list[str]:
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


def _legend(shown: set[str], start_row: bool) -> str:
    """What the shown columns mean, from the metrics' own descriptions."""
    parts = []
    for metric in METRICS:
        headers = [c.header for c in metric.columns if c.model != "probe" and c.header in shown]
        if headers:
            parts.append(f"{' / '.join(headers)}: {metric.description}")
    probe = [(c.header, m) for m in METRICS for c in m.columns if c.model == "probe" and c.header in shown]
    if probe:
        names = " / ".join(m.name.removeprefix("eval/").replace("_", " ") for _, m in probe)
        where = "at the states of 64 training records (the end-of-run probe) instead of the test responses' states"
        parts.append(f"{' / '.join(h for h, _ in probe)}: {names} {where}")
    text = (
        "All figures on the test prompts, mean ± std over seeds. 'last': the model at the end of training; "
        "'best-val': the checkpoint with the best validation score (--metric-for-best-model), scored on the test "
        "prompts. " + "; ".join(parts) + "."
    )
    if start_row:
        text += " The first row is the student before any training, sampled once per seed (its spread is the test "
        text += "sampling's noise alone)."
    return text


def results_table(summaries: list[RunSummary]) -> str:
    """Markdown: per agent, mean ± std over seeds of each test column, the separations, a legend."""
    shown = [(name, get) for name, get in COLUMNS if any(np.isfinite(get(s)) for s in summaries)]
    header = ["agent", "seeds", "train s/run"] + [name for name, _ in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in _groups(summaries).items():
        cells = [label, str(len(runs)), f"{np.mean([_metric(r, 'run', 'train_time_s') for r in runs]):.0f}"]
        cells += [_cell(np.array([get(r) for r in runs], dtype=float)) for _, get in shown]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = separations(summaries)
    start = bool(summaries) and _metric(summaries[0], "run", "steps") == 0
    lines += [
        "",
        "Beyond the seed spread (test Rouge-L of the last model; the difference of means exceeds the sum of the "
        "standard deviations; rows of one seed take no part): " + ("; ".join(pairs) if pairs else "no pair") + ".",
        "",
        _legend({name for name, _ in shown}, start),
    ]
    return "\n".join(lines) + "\n"


#: The panels of ``eval_curves.png``: (validation metric, axis label). Sampled Rouge-L alone misleads: it
#: rises when a student merely sharpens towards the teacher's mode. The entropy of its sampling
#: distribution beside it shows whether a gain came with a collapse; it is chosen over ``eval/outside_mass``
#: because it needs no teacher set to read and the table already reports the outside mass of the test
#: model, while the entropy's course during training is what no final number shows.
CURVES = (("eval/rougeL", "validation Rouge-L"), ("eval/entropy", "validation entropy (nats)"))


def _curves(summaries: list[RunSummary], key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per agent with a validation history: (steps, mean, min, max) of ``key`` over its seeds, on the steps
    every seed evaluated (runs of different lengths are cut to the common steps). Rows without a history (the
    starting student) are left out."""
    out = {}
    for label, runs in _groups(summaries).items():
        curves = [c for c in (_metric(r, "history", key) for r in runs) if c]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            values = np.array([[c[step] for step in steps] for c in curves], dtype=float)
            out[label] = (np.array(steps), values.mean(0), values.min(0), values.max(0))
    return out


def _plot(summaries: list[RunSummary], path: Path):
    """``eval_curves.png`` (:data:`CURVES`): per agent the mean over seeds (line) and the min..max band.
    Returns the matplotlib Figure (closed: its data stay readable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4))
    for ax, (key, ylabel) in zip(axes, CURVES):
        for label, (steps, mean, lo, hi) in _curves(summaries, key).items():
            (line,) = ax.plot(steps, mean, marker="o", label=label)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(title="line: mean over seeds\nband: min..max", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
