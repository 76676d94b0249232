"""The paper's table in miniature: every agent, same data, same budget, 3 seeds; the ablations; and
validation Rouge-L against training time for BD (cached annotation, sparse) and for word-level KD
with the teacher run online over the full vocabulary.

    python -m benchmarks.reproduce --budget smoke          # tiny models, a few minutes: the plumbing
    python -m benchmarks.reproduce --budget cpu            # bundled teacher, CPU, ~30 minutes
    python -m benchmarks.reproduce --budget gpu --device cuda

Protocol (identical for every method; no method gets its own tuning):

* teacher: the bundled SmolLM2-135M-Instruct (``smoke``: the tiny test teacher); student:
  ``from_teacher_layers`` with the layers of the budget (teacher embeddings, final norm, LM head and
  the listed decoder layers);
* data: the bundled training prompts with one teacher response each (sampled at top-p 0.8), annotated
  once (K = 64, p = 0.8) and cached; every method reads the same cache in the same seeded order;
* same steps, batch size, learning rate and schedule for every method; seeds 0..n-1 (initial weights
  are the teacher's, so the seed sets the data order and the sampling);
* during training: validation Rouge-L every ``eval_every`` steps (model selection, the curve);
  at the end: the last model and the best-validation model on the **test split**: Rouge-L (x100,
  stemmed, against the teacher's greedy response), teacher NLL per token of the student's samples, and
  coverage (fraction of student tokens inside the teacher's A_0.8(s)); mean +- std over seeds.
  Sampling at top-p 0.8, temperature 1 (the paper's protocol).

Methods: SFT/SeqKD (``bc:mode=sft``), KD (``bc``, on A_p), SQL, Implicit Q-Learning (``iql``),
IQ-Learn (``iqlearn`` on the full vocabulary: the paper's "IQL" baseline = BD with p = 1, no mask),
CQL, BD (``bd``). Ablations of BD: p in {1.0 (no mask), 0.8, 0.5}; chi^2 off; expert term ``topp_mean``
(the authors' released code) instead of the data token.

Every finished run is recorded in ``<out>/records.json`` as soon as it ends: an interrupted
reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tdrl.config import TrainConfig
from tdrl.data import annotate, load_source, write_json_atomic
from tdrl.evaluation import EvalConfig, evaluate
from tdrl.teachers import load_teacher
from tdrl.trainer import Trainer, eval_records, prepare_bundled_data

MAIN = [
    ("SFT / SeqKD", "bc:mode=sft"),
    ("KD (on A_p)", "bc:mode=kd"),
    ("SQL", "sql"),
    ("IQL (Implicit Q-Learning)", "iql"),
    ("IQ-Learn (full V)", "iqlearn:restrict=none,top_p=1.0"),
    ("CQL", "cql"),
    ("BD", "bd"),
]
ABLATIONS = [
    ("BD p = 0.8 (default)", "bd"),
    ("BD p = 1.0 (no mask)", "iqlearn:restrict=none,top_p=1.0"),
    ("BD p = 0.5", "bd:top_p=0.5"),
    ("BD without chi^2", "bd:chi2=false"),
    ("BD expert_term = topp_mean", "bd:expert_term=topp_mean"),
    ("BD + outside-mass term (outside_coef = 1)", "bd:outside_coef=1.0"),
]
BC = ("bc:mode=sft", "bc:mode=kd")
TD = ("sql", "iql", "iqlearn:restrict=none,top_p=1.0", "cql", "bd")
ONLINE = ("KD, teacher online, full V", "kd-online")

BUDGETS = {
    "smoke": dict(
        teacher="tiny", student="tiny", train_prompts=64, response_tokens=12, steps=24, batch_size=8, lr=1e-3,
        eval_every=8, eval_prompts=8, eval_max_new_tokens=12, test_prompts=16, seeds=3, curve_seeds=1,
        warm_start_steps=8, warm_start_lr=1e-3,
    ),
    "cpu": dict(
        teacher="bundled", student="layers:0,10,20,29", train_prompts=192, response_tokens=40, steps=32,
        batch_size=8, lr=2e-5, eval_every=8, eval_prompts=10, eval_max_new_tokens=24, test_prompts=24, seeds=3,
        curve_seeds=1, warm_start_steps=64, warm_start_lr=1e-4,
    ),
    "gpu": dict(
        teacher="bundled", student="layers:0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,29", train_prompts=0,
        response_tokens=64, steps=1500, batch_size=32, lr=5e-5, eval_every=100, eval_prompts=64,
        eval_max_new_tokens=64, test_prompts=225, seeds=3, curve_seeds=3, eval_seeds="0,1,2,3,4",
        warm_start_steps=500, warm_start_lr=5e-5,
    ),
}  # fmt: skip


def base_config(budget: dict, device: str, out: Path) -> TrainConfig:
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in budget.items() if k in keys}
    return TrainConfig(
        **values, device=device, data="bundled", warmup_steps=max(1, budget["steps"] // 10), log_every=4,
        checkpoint_every=budget["steps"], keep_last=1, top_k=64, top_p=0.8, out=str(out),
    )  # fmt: skip


WARM_START = "bc:mode=kd,restrict=none"


def drop_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's checkpoints and best/ export (its events and summary stay)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "best", ignore_errors=True)


def warm_start(base: TrainConfig, teacher, steps: int, lr: float, out: Path, store: dict) -> tuple[str, dict]:
    """The shared starting student: ``base.student`` trained with KD over the full vocabulary (on the
    cached top-K teacher log-probs) for ``steps`` steps, seed 0, exported to ``out/warm-start``.

    The paper's students start from SFT; a student cut out of the teacher's layers does not even
    write words, and the top-p losses never push down the tokens outside A_p(s) that it then
    samples at decoding time (see RESULTS.md: from the raw student BD stays near Rouge-L 0), so every
    method starts from this one checkpoint."""
    target = out / "warm-start"
    config = dataclasses.replace(
        base, agent="bc", agent_args="mode=kd,restrict=none", seed=0, steps=steps, lr=lr, eval_every=0,
        out=str(out / "runs" / "warm-start"), checkpoint_every=steps,
    )  # fmt: skip
    key = "warm-start-" + run_key(config)
    if key in store and (target / "model.safetensors").is_file():
        return str(target), store[key]
    trainer = Trainer(config, teacher=teacher, progress=False)
    summary = trainer.train()
    shutil.rmtree(target, ignore_errors=True)
    trainer.student.save_pretrained(target)
    drop_checkpoints(Path(config.out))
    store[key] = {"train_time_s": summary["train_time_s"], "steps": steps,
                  "val_rougeL": summary["last"]["metrics"]["eval/rougeL"]}  # fmt: skip
    write_json_atomic(out / "records.json", store)
    return str(target), store[key]


def run_key(config: TrainConfig) -> str:
    keep = {k: v for k, v in config.to_dict().items() if k != "out"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def test_metrics(trainer: Trainer, summary: dict, records: list[dict], eval_config: EvalConfig) -> dict:
    """The last model and the best-validation model (``best/``) on the test records."""
    from transformers import AutoModelForCausalLM

    temperature = trainer.agent.decode_temperature
    student = trainer.student
    last, _ = evaluate(student.model, student.tokenizer, trainer.teacher, records, eval_config,
                       decode_temperature=temperature)  # fmt: skip
    best_step = (summary.get("best") or {}).get("step")
    if best_step is None or best_step == summary["steps"]:
        best = last
    else:
        model = AutoModelForCausalLM.from_pretrained(str(trainer.out / "best")).to(trainer.config.device)
        best, _ = evaluate(model, student.tokenizer, trainer.teacher, records, eval_config,
                           decode_temperature=temperature)  # fmt: skip
    return {"last": last, "best": best, "best_step": best_step}


def run_one(
    label, spec, seed, base, teacher, test_records, eval_config, store, out, keep_checkpoints=False, prefix=""
) -> dict:
    name, _, args = spec.partition(":")
    tag = "".join(c if c.isalnum() or c in "=.-" else "_" for c in spec)
    run_dir = out / "runs" / f"{prefix}{tag}-seed{seed}"
    config = dataclasses.replace(base, agent=name, agent_args=args, seed=seed, out=str(run_dir))
    key = run_key(config)
    if key in store:
        return store[key]
    trainer = Trainer(config, teacher=teacher, progress=False)
    summary = trainer.train()
    record = {
        "label": label, "spec": spec, "seed": seed, "steps": summary["steps"],
        "wall_time_s": summary["wall_time_s"], "train_time_s": summary["train_time_s"],
        "history": [{"step": h["step"], "train_time_s": h["train_time_s"], "rougeL": h["metrics"]["eval/rougeL"]}
                    for h in summary["history"]],
        "test": test_metrics(trainer, summary, test_records, eval_config),
    }  # fmt: skip
    store[key] = record
    write_json_atomic(out / "records.json", store)
    if not keep_checkpoints:  # keep events and summary; checkpoints of 31 runs would fill a disk
        drop_checkpoints(run_dir)
    print(f"  {label} seed {seed}: test Rouge-L last {record['test']['last']['eval/rougeL']:.2f}, "
          f"{record['wall_time_s']:.0f} s", flush=True)  # fmt: skip
    return record


def _cell(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) else "-"


def metric_table(rows: list[tuple[str, list[dict]]]) -> str:
    metrics = [("eval/rougeL", "Rouge-L"), ("eval/teacher_nll", "teacher NLL"), ("eval/coverage", "coverage")]
    head = ["method", "seeds"] + [f"{name} ({w})" for _, name in metrics for w in ("last", "best")] + ["train s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, records in rows:
        cells = [label, str(len(records))]
        for key, _ in metrics:
            for which in ("last", "best"):
                cells.append(_cell([r["test"][which][key] for r in records]))
        cells.append(f"{np.mean([r['train_time_s'] for r in records]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(by_spec: dict[str, list[dict]], labels: dict[str, str]) -> str:
    """Which TD agents beat the better BC baseline on last test Rouge-L, by more than the seeds' spread."""

    def stats(spec):
        v = np.array([r["test"]["last"]["eval/rougeL"] for r in by_spec[spec]])
        return v.mean(), v.std()

    bc_spec = max(BC, key=lambda s: stats(s)[0])
    bc_mean, bc_std = stats(bc_spec)
    parts = []
    for spec in TD:
        mean, std = stats(spec)
        diff = mean - bc_mean
        if abs(diff) <= std + bc_std:
            word = "within the seed spread"
        else:
            word = "above" if diff > 0 else "below"
        parts.append(f"{labels[spec]} {mean:.2f} ({diff:+.2f}: {word})")
    return (
        f"Last test Rouge-L against the better BC baseline, {labels[bc_spec]} ({bc_mean:.2f} ± {bc_std:.2f}): "
        + "; ".join(parts)
        + ". 'Within the seed spread' = the difference of means is no larger than the sum of the two standard "
        "deviations."
    )


def curve_section(bd: list[dict], online: list[dict], annotate_s: float | None, out: Path) -> str:
    def summary(records):
        best = [max(r["history"], key=lambda h: h["rougeL"]) for r in records]
        return (
            np.mean([b["rougeL"] for b in best]), np.mean([b["train_time_s"] for b in best]),
            np.mean([r["train_time_s"] / r["steps"] for r in records]),
        )  # fmt: skip

    lines = [
        "| method | seeds | best validation Rouge-L | training time to best (s) | s/step |",
        "|---|---|---|---|---|",
    ]
    results = {}
    for label, records in (("BD (cached annotation, A_p)", bd), (ONLINE[0], online)):
        rouge, t_best, per_step = summary(records)
        results[label] = (rouge, t_best, per_step)
        lines.append(f"| {label} | {len(records)} | {rouge:.2f} | {t_best:.1f} | {per_step:.2f} |")
    (bd_r, bd_t, bd_s), (on_r, on_t, on_s) = results.values()
    target = min(bd_r, on_r)

    def time_to(records):  # mean over seeds of the first evaluation at or above the common target
        hits = [next((h["train_time_s"] for h in r["history"] if h["rougeL"] >= target), None) for r in records]
        hits = [h for h in hits if h is not None]
        return (np.mean(hits), len(hits)) if hits else (float("nan"), 0)

    (bd_hit, bd_n), (on_hit, on_n) = time_to(bd), time_to(online)
    lines += [
        "",
        f"Per step, BD runs {on_s / bd_s:.2f}x faster than KD with the teacher online ({bd_s:.2f} s against "
        f"{on_s:.2f} s). Best validation Rouge-L: BD {bd_r:.2f} after {bd_t:.1f} s of training, KD online {on_r:.2f} "
        f"after {on_t:.1f} s"
        + (" (BD's best is lower, so 'sooner' would compare different targets)" if bd_r < on_r else "")
        + f". Time to first reach the lower of the two bests ({target:.2f}): BD {bd_hit:.1f} s ({bd_n} of "
        f"{len(bd)} seeds), KD online {on_hit:.1f} s ({on_n} of {len(online)}); the resolution is one evaluation "
        "interval. "
        + (
            f"BD's one-off cost, annotating the training data (top-K log-probs, one teacher forward per response), "
            f"took {annotate_s:.1f} s; amortised over every run and agent that reads the cache."
            if annotate_s is not None
            else ""
        ),
        "",
        "Validation Rouge-L against training time (evaluation time excluded), seed 0:",
        "",
        "| method | step | training time (s) | validation Rouge-L |",
        "|---|---|---|---|",
    ]
    for label, records in (("BD", bd), ("KD online", online)):
        for h in records[0]["history"]:
            lines.append(f"| {label} | {h['step']} | {h['train_time_s']:.1f} | {h['rougeL']:.2f} |")
    _plot(bd, online, out / "rouge_vs_time.png")
    return "\n".join(lines)


def _plot(bd, online, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, records, colour in (("BD (sparse, cached)", bd, "C0"), ("KD, teacher online", online, "C1")):
        for i, r in enumerate(records):
            ax.plot([h["train_time_s"] for h in r["history"]], [h["rougeL"] for h in r["history"]], marker="o",
                    color=colour, alpha=0.8, label=label if i == 0 else None)  # fmt: skip
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("validation Rouge-L")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def annotation_seconds(teacher, base: TrainConfig) -> float:
    """Time to annotate the cached training responses once more (into a throw-away directory)."""
    data_dir = prepare_bundled_data(teacher, base, progress=False)
    responses = load_source(data_dir.parent / "responses")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        annotate(teacher, responses, Path(tmp) / "a", top_k=base.top_k, top_p=base.top_p, progress=False)
        return time.perf_counter() - start


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, help="override the budget's number of seeds")
    parser.add_argument("--steps", type=int, help="override the budget's step count")
    parser.add_argument("--lr", type=float, help="override the budget's learning rate (all methods)")
    parser.add_argument("--out", default=None, help="default: runs/reproduce-<budget>")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore runs recorded by an earlier call in --out")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints and best/")
    parser.add_argument("--no-curve", action="store_true")
    parser.add_argument("--only", nargs="+", help="run just these agent specs (e.g. bd kd-online), print, and stop")
    args = parser.parse_args(argv)
    budget = dict(BUDGETS[args.budget])
    if args.seeds:
        budget["seeds"] = args.seeds
    if args.steps:
        budget["steps"] = args.steps
        budget["eval_every"] = max(1, args.steps // 4)
    if args.lr:
        budget["lr"] = args.lr
    out = Path(args.out or f"runs/reproduce-{args.budget}")
    out.mkdir(parents=True, exist_ok=True)
    recorded = (out / "records.json").is_file() and not args.fresh
    store = json.loads((out / "records.json").read_text()) if recorded else {}
    if args.fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)
    started = time.perf_counter()
    base = base_config(budget, args.device, out)
    teacher = load_teacher(base.teacher, device=args.device)
    prepare_bundled_data(teacher, base, progress=False)
    raw_student = base.student
    warm = None
    if budget["warm_start_steps"]:
        path, warm = warm_start(base, teacher, budget["warm_start_steps"], budget["warm_start_lr"], out, store)
        base = dataclasses.replace(base, student=path)
    test_records = eval_records(teacher, budget["test_prompts"], base.eval_max_new_tokens, split="test")
    eval_config = EvalConfig(max_new_tokens=base.eval_max_new_tokens, seeds=base.seed_list(), top_p=0.8)
    seeds = list(range(budget["seeds"]))
    run = lambda label, spec, seed: run_one(
        label, spec, seed, base, teacher, test_records, eval_config, store, out, args.keep_checkpoints
    )

    if args.only:
        return "\n".join(json.dumps(run(spec, spec, s)["test"]["last"]) for spec in args.only for s in seeds)
    by_spec: dict[str, list[dict]] = {}
    labels = {}
    for label, spec in MAIN + ABLATIONS:
        labels.setdefault(spec, label)
    for label, spec in MAIN:
        by_spec[spec] = [run(label, spec, s) for s in seeds]
    if not args.no_ablations:
        for label, spec in ABLATIONS:
            by_spec.setdefault(spec, [run(label, spec, s) for s in seeds])
    start = (
        f"`{raw_student}` warm-started with {WARM_START} (full-vocabulary KD on the cached top-K log-probs) for "
        f"{warm['steps']} steps at lr {budget['warm_start_lr']:g} ({warm['train_time_s']:.0f} s; validation Rouge-L "
        f"{warm['val_rougeL']:.2f}), the same starting checkpoint for every method"
        if warm
        else f"`{raw_student}`"
    )
    sections = [
        f"Budget `{args.budget}` on {args.device}: teacher {base.teacher}, student {start}, "
        f"{base.train_prompts or 'all'} bundled training prompts x 1 teacher response of up to {base.response_tokens} "
        f"tokens (K = 64, p = 0.8), {base.steps} steps x batch {base.batch_size}, lr {base.lr:g} (cosine, "
        f"{base.warmup_steps} warm-up), seeds {', '.join(map(str, seeds))}. Validation: {base.eval_prompts} prompts "
        f"every {base.eval_every} steps; test: {budget['test_prompts']} prompts, last and best-validation model, "
        f"sampling top-p 0.8 / T = 1, {base.eval_max_new_tokens} new tokens.",
        "",
        metric_table([(label, by_spec[spec]) for label, spec in MAIN]),
        "",
        verdict(by_spec, labels),
    ]
    if not args.no_ablations:
        sections += [
            "",
            "**Ablations of BD** (same budget and seeds):",
            "",
            metric_table([(label, by_spec[spec]) for label, spec in ABLATIONS]),
        ]
    if not args.no_curve:
        online = [run(ONLINE[0], ONLINE[1], s) for s in range(budget["curve_seeds"])]
        key = f"annotation-{run_key(base)}"
        if key not in store:
            store[key] = annotation_seconds(teacher, base)
            write_json_atomic(out / "records.json", store)
        sections += [
            "",
            "**Time to quality: BD (cached annotation, sparse) against KD with the teacher online (full vocabulary)**",
            "",
            curve_section(by_spec["bd"], online, store[key], out),
        ]
    if warm:
        raw_base = dataclasses.replace(base, student=raw_student)
        raw = [
            (label, run_one(label, spec, 0, raw_base, teacher, test_records, eval_config, store, out, prefix="raw-"))
            for label, spec in (("BD", "bd"), ONLINE)
        ]
        sections += [
            "",
            f"**Without the warm start** (from the raw `{raw_student}`, seed 0, same steps): test Rouge-L "
            + "; ".join(f"{label} {r['test']['last']['eval/rougeL']:.2f}" for label, r in raw)
            + ". Validation Rouge-L along the run: "
            + "; ".join(f"{label} " + ", ".join(f"{h['rougeL']:.1f}" for h in r["history"]) for label, r in raw)
            + ". The top-p losses only shape the student's logits on A_p(s); a student that starts far from the "
            "teacher keeps high logits elsewhere and samples them.",
        ]
    elapsed = time.perf_counter() - started
    sections += ["", f"Reproduction wall time: {elapsed:.0f} s (finished runs recorded in {out} are reused)."]
    text = "\n".join(sections)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
