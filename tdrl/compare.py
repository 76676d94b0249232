"""The compare harness: the same data, budget and seeds for every agent; one table, one plot.

``tdrl compare --agents bc,sql,iql,iqlearn,cql,bd --seeds 3 --steps N`` writes into ``--out``:

* ``runs/<agent>-seed<k>/``: each run's TensorBoard events, checkpoints, ``best/`` and summary;
  ``tensorboard --logdir <out>/runs`` shows them all (HParams tab included);
* ``results.csv``: one row per run (last and best evaluation metrics, wall time);
* ``results.md``: mean +- std over seeds per agent, last and best (CORL style);
* ``eval_curves.png``: validation Rouge-L against step per agent (mean over seeds).

Agent specs: a registered name, ``name:key=value,...`` for settings, and the aliases ``kd``
(= ``bc:mode=kd``), ``sft`` / ``seqkd`` (= ``bc:mode=sft``).
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np

from tdrl.config import TrainConfig
from tdrl.errors import ConfigError
from tdrl.teachers import load_teacher

__all__ = ["parse_agent_spec", "compare", "results_table", "METRICS"]

ALIASES = {"kd": "bc:mode=kd", "sft": "bc:mode=sft", "seqkd": "bc:mode=sft"}
METRICS = ("eval/rougeL", "eval/teacher_nll", "eval/coverage", "eval/answer_match", "eval/length")


def parse_agent_spec(spec: str) -> tuple[str, str, str]:
    """``"sql:alpha=0.5"`` -> (label, agent name, agent_args)."""
    label = spec.strip()
    resolved = ALIASES.get(label, label)
    name, _, args = resolved.partition(":")
    from tdrl.agents import get_agent

    get_agent(name)
    return re.sub(r"[^\w.=-]+", "_", label), name, args


def compare(
    agents: list[str], seeds: list[int], base: TrainConfig, out: str | Path, progress: bool = True
) -> list[dict]:
    """Train every (agent, seed) with ``base``'s settings; write results.{csv,md} and the plot."""
    from tdrl.trainer import Trainer

    out = Path(out)
    if not agents:
        raise ConfigError("compare needs at least one agent")
    specs = [parse_agent_spec(a) for a in agents]  # all names checked before anything trains
    teacher = load_teacher(base.teacher, dtype=base.teacher_dtype, device=base.device)
    summaries = []
    for label, name, args in specs:
        for seed in seeds:
            config = dataclasses.replace(
                base, agent=name, agent_args=args, seed=seed, out=str(out / "runs" / f"{label}-seed{seed}")
            )
            summary = Trainer(config, teacher=teacher, progress=progress).train()
            summary["label"] = label
            summaries.append(summary)
    write_results(summaries, out)
    return summaries


def _get(summary: dict, which: str, key: str) -> float:
    entry = summary.get(which) or {}
    return entry.get("metrics", {}).get(key, float("nan"))


def write_results(summaries: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["agent", "seed", "steps", "wall_time_s", "best_step"]
            + [f"{w}_{m.split('/')[1]}" for w in ("last", "best") for m in METRICS]
        )
        for s in summaries:
            writer.writerow(
                [s["label"], s["seed"], s["steps"], f"{s['wall_time_s']:.1f}", (s.get("best") or {}).get("step")]
                + [f"{_get(s, w, m):.4f}" for w in ("last", "best") for m in METRICS]
            )
    (out / "results.md").write_text(results_table(summaries))
    _plot(summaries, out / "eval_curves.png")


def results_table(summaries: list[dict]) -> str:
    """Markdown: per agent, mean +- std over seeds of each metric, last and best (by Rouge-L)."""
    labels = list(dict.fromkeys(s["label"] for s in summaries))
    shown = [m for m in METRICS if any(np.isfinite(_get(s, "last", m)) for s in summaries)]
    header = ["agent", "seeds", "s/run"] + [f"{m.split('/')[1]} ({w})" for m in shown for w in ("last", "best")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        runs = [s for s in summaries if s["label"] == label]
        cells = [label, str(len(runs)), f"{np.mean([r['wall_time_s'] for r in runs]):.0f}"]
        for m in shown:
            for w in ("last", "best"):
                values = np.array([_get(r, w, m) for r in runs])
                cells.append(
                    f"{np.nanmean(values):.2f} ± {np.nanstd(values):.2f}" if np.isfinite(values).any() else "-"
                )
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nRouge-L: F1 x 100 vs the teacher's greedy response on bundled validation prompts; teacher_nll: "
        "teacher NLL per token of the student's samples; coverage: fraction of student tokens inside the "
        "teacher's A_p(s). 'best' = the evaluation with the highest Rouge-L (the paper's model selection).\n"
    )
    return "\n".join(lines) + "\n" + note


def _plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label in dict.fromkeys(s["label"] for s in summaries):
        runs = [s for s in summaries if s["label"] == label and s["history"]]
        if not runs:
            continue
        steps = [h["step"] for h in runs[0]["history"]]
        curves = [[h["metrics"]["eval/rougeL"] for h in r["history"]][: len(steps)] for r in runs]
        width = min(len(c) for c in curves)
        ax.plot(steps[:width], np.mean([c[:width] for c in curves], axis=0), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation Rouge-L")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
