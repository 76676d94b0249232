"""The paper's table in miniature: every agent, same data, same budget, 3 seeds; the ablations of BD;
and validation Rouge-L against training time for BD, MiniLLM and word-level KD with the teacher run
online over the full vocabulary.

    python -m benchmarks.reproduce --budget smoke          # tiny models, a few minutes: the plumbing
    python -m benchmarks.reproduce --budget cpu            # bundled teacher, CPU, about an hour
    python -m benchmarks.reproduce --budget paper --seeds 1 --only bc:mode=sft bd   # the paper's protocol,
                                                           # from the recipe's warm start (12-15 min a run)
    python -m benchmarks.reproduce --budget gpu --device cuda

Protocol (identical for every method; no method gets its own tuning):

* teacher: the bundled SmolLM2-135M-Instruct (``smoke``: the tiny test teacher); student:
  ``from_teacher_layers`` with the layers of the budget, warm-started once for everyone with
  :func:`tdrl.training.warmstart.warm_start` (full-vocabulary KD on the cached annotation), as the paper's
  students start from SFT;
* data: the bundled training prompts with one teacher response each (sampled at top-p 0.8), annotated
  once (K = 64, p = 0.8) and cached; every method reads the same cache in the same seeded order;
* same steps, batch size, learning rate and schedule for every method, each agent's documented
  defaults (its own presets included: bd's J_PT, the on-policy agents' collection); seeds 0..n-1;
* during training: validation Rouge-L every ``eval_every`` steps (model selection, the curve); at the
  end the trainer scores the last and the best-validation model on the **test split**
  (:meth:`tdrl.training.Trainer.test`) and probes the decoding policy's mass outside A_p(s)
  (:meth:`~tdrl.training.Trainer.probe`); the table is :func:`tdrl.compare.results_table`.
  Sampling at top-p 0.8, temperature 1, no top-k cap (the paper's protocol).

Every finished run is recorded in ``<out>/records.json`` as soon as it ends: an interrupted
reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from tdrl.compare import results_table, start_row
from tdrl.data import annotate, load_source, prepare_bundled_data
from tdrl.integrity import write_json_atomic
from tdrl.models import load_teacher
from tdrl.training import RunSummary, TrainConfig, build_trainer
from tdrl.training.config import config_leaves
from tdrl.training.warmstart import RECIPE, WARM_START_FILE, warm_start, warm_start_config

MAIN = [
    ("SFT / SeqKD", "bc:mode=sft"),
    ("KD", "bc:mode=kd"),
    ("SQL", "sql"),
    ("IQL (Implicit Q-Learning)", "iql"),
    ("IQ-Learn (the paper's 'IQL')", "iqlearn"),
    ("CQL", "cql"),
    ("BD", "bd"),
    ("GKD", "gkd"),
    ("MiniLLM", "minillm"),
]
ABLATIONS = [
    ("BD (default: p = 0.8, released expert term, max over A_p(s), J_PT)", "bd"),
    ("BD as released (max over V: bd-released)", "bd-released"),
    ("BD p = 1.0 (every top-K token)", "bd:top_p=1.0"),
    ("BD p = 0.5", "bd:top_p=0.5"),
    ("BD without chi^2", "bd:chi2=false"),
    ("BD expert_term = token (the equation)", "bd:expert_term=token"),
    ("BD without J_PT (lm_coef = 0)", "bd|lm_coef=0"),
    ("BD + support term (support_coef = 1)", "bd:support_coef=1.0"),
    ("BD, set-only normaliser (restrict = set)", "bd:restrict=set"),
]
#: The paper's table under its protocol (budget ``paper``): the methods it compares and BD's main ablations.
#: The bundled responses are the teacher's, so SFT on them is SeqKD (the paper's SFT reads Dolly's human
#: responses, which the bundled set has not).
PAPER_MAIN = [
    ("SFT / SeqKD", "bc:mode=sft"),
    ("KD", "bc:mode=kd"),
    ("MiniLLM", "minillm"),
    ("BD as released (max over V)", "bd:max_over=vocab"),
    ("BD, max over A_p(s)", "bd:max_over=set"),
]
PAPER_ABLATIONS = [
    ("BD as released, without chi^2", "bd:max_over=vocab,chi2=false"),
    ("BD as released, p = 1.0", "bd:max_over=vocab,top_p=1.0"),
]
BC = ("bc:mode=sft", "bc:mode=kd")
TD = ("sql", "iql", "iqlearn", "cql", "bd")
ONLINE = ("KD, teacher online, full V", "kd-online")

BUDGETS = {
    "smoke": dict(
        teacher="tiny",
        student="tiny",
        train_prompts=64,
        response_tokens=12,
        steps=24,
        batch_size=8,
        lr=1e-3,
        eval_every=8,
        eval_prompts=8,
        eval_max_new_tokens=12,
        test_prompts=16,
        seeds=3,
        curve_seeds=1,
        warm_start_steps=8,
        warm_start_lr=1e-3,
    ),
    "cpu": dict(
        teacher="bundled",
        student="layers:0,10,20,29",
        train_prompts=192,
        response_tokens=40,
        steps=32,
        batch_size=8,
        lr=2e-5,
        eval_every=8,
        eval_prompts=10,
        eval_max_new_tokens=24,
        test_prompts=24,
        seeds=3,
        curve_seeds=1,
        warm_start_steps=64,
        warm_start_lr=1e-4,
    ),
    # The paper's protocol: AdamW (0.9, 0.95), lr 5e-6, effective batch 64 (8 x 8 accumulated), 10% warm-up
    # then cosine, about one pass over the training responses (1,810 / 64 = 29 steps), best-validation
    # selection (bundled validation prompts), 5 test sampling seeds on the held-out prompts; from the
    # recipe's warm start (RECIPE: 16-layer cut, 256 steps).
    "paper": dict(
        teacher="bundled",
        teacher_dtype="bfloat16",
        mixed_precision="bf16",
        student=RECIPE["student"],
        train_prompts=0,
        response_tokens=40,
        steps=29,
        batch_size=8,
        grad_accum=8,
        lr=5e-6,
        adam_beta1=0.9,
        adam_beta2=0.95,
        schedule="cosine",
        warmup_steps=3,
        eval_every=10,
        eval_prompts=24,
        eval_split="validation",
        eval_max_new_tokens=32,
        test_prompts=64,
        test_split="heldout",
        test_seeds=[0, 1, 2, 3, 4],
        seeds=3,
        curve_seeds=1,
        warm_start_steps=256,
        warm_start_lr=RECIPE["lr"],
        warm_start=RECIPE,
        main=PAPER_MAIN,
        ablations=PAPER_ABLATIONS,
        curve_bd="bd:max_over=set",
    ),
    "gpu": dict(
        teacher="bundled",
        student="layers:0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,29",
        train_prompts=0,
        response_tokens=64,
        steps=1500,
        batch_size=32,
        lr=5e-5,
        eval_every=100,
        eval_prompts=64,
        eval_max_new_tokens=64,
        test_prompts=225,
        seeds=3,
        curve_seeds=3,
        eval_seeds=[0, 1, 2, 3, 4],
        warm_start_steps=500,
        warm_start_lr=5e-5,
    ),
}


def base_config(budget: dict, device: str, out: Path) -> TrainConfig:
    """The settings every run of ``budget`` shares (the budget's keys that are config flags). Validation
    starts after training has (no step-0 evaluation): the curves, the best-validation model and the
    records' keys are those of the runs before the trainer learnt to evaluate the starting student."""
    flags = {flag for _, _, flag in config_leaves()}
    values = {k: v for k, v in budget.items() if k in flags}
    values.setdefault("warmup_steps", max(1, budget["steps"] // 10))
    values.update(
        device=device,
        data="bundled",
        log_every=4,
        checkpoint_every=budget["steps"],
        keep_last=1,
        annotation_top_k=64,
        annotation_top_p=0.8,
        out=str(out),
        overwrite=True,
        eval_on_start=False,
    )
    return TrainConfig.from_dict(values)


def drop_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's checkpoints and best/ export (its events and summary stay)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "best", ignore_errors=True)


def record_settings(config: TrainConfig, agent_args: str | None = None) -> dict:
    """What a record's key hashes: every setting but ``out``, by the flat names and in the plain types of
    tdrl 0.1 (``agent_args`` the spec's settings string, seeds comma-separated strings, an unset
    ``test_split`` the old default ``heldout``), so the records.json files of earlier versions stay
    valid. ``agent_args``: the settings string of the spec ``config.agent_config`` was built from
    (checked against it); needed whenever the config has agent settings. ``eval_on_start`` and the
    settings of :data:`SINCE_0_1`, which tdrl 0.1 had not, join the key only when on or not at their
    default (0.1's runs were those without them)."""
    flat = config.flat()
    agent_config, on_start = flat.pop("agent_config"), flat.pop("eval_on_start")
    later = {name: flat.pop(name) for name in SINCE_0_1}
    if agent_args is None and agent_config is not None:
        raise ValueError("the config has agent settings: pass agent_args, the spec's settings string")
    agent_args = agent_args or ""
    if TrainConfig.from_dict({"agent": config.agent, "agent_args": agent_args}).flat()["agent_config"] != agent_config:
        raise ValueError(f"agent_args {agent_args!r} are not the config's agent settings {agent_config}")
    values = {k: v for k, v in flat.items() if k != "out"}
    values.update(
        agent_args=agent_args,
        eval_seeds=",".join(map(str, flat["eval_seeds"])),
        test_seeds="" if flat["test_seeds"] is None else ",".join(map(str, flat["test_seeds"])),
        test_split="heldout" if flat["test_split"] is None else flat["test_split"],
    )
    if on_start:
        values["eval_on_start"] = True
    values.update({name: value for name, value in later.items() if value != SINCE_0_1[name]})
    return values


#: Settings added after tdrl 0.1, with the value its runs had: a record's key holds them only when they differ.
#: (``annotation_keep_top_p`` unset: the bundled cache keeps candidates to mass max(0.9, the agent's p), in
#: the compact layout; runs recorded on the full layout of 0.2 gave the same batches up to float16 rounding of
#: the in-set log-probs: benchmarks/RESULTS.md section 7.)
SINCE_0_1 = {
    "teacher_device_map": None,
    "annotation_keep_top_p": None,
    "fsdp": False,
    "gradient_checkpointing": False,
    "lora_rank": 0,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_target_modules": "all-linear",
    "lora_export": "merged",
}


def run_key(
    config: TrainConfig, store: dict | None = None, prefix: str = "", suffix: str = "", agent_args: str | None = None
) -> str:
    """The key of a run's record: every setting but where it is written (:func:`record_settings`), with a
    warm-started student named by its fingerprint, not its path (``--out runs/x`` and ``--out /abs/runs/x``
    reuse the same records). With ``store``, a record filed under the path-based key of earlier versions
    is moved to this key."""
    keep = record_settings(config, agent_args)
    legacy = prefix + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16] + suffix
    marker = Path(config.student) / WARM_START_FILE
    if marker.is_file():
        keep["student"] = "warm-start:" + json.loads(marker.read_text())["fingerprint"]
    key = prefix + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16] + suffix
    if store is not None and key not in store and legacy in store:
        store[key] = store.pop(legacy)
    return key


def run_one(label, spec, seed, base, teacher, store, out, keep_checkpoints=False, prefix="") -> dict:
    """Train one (spec, seed), or read it back from ``store``; ``spec`` is ``agent[:args][|trainer=value,...]``."""
    agent_spec, _, trainer_args = spec.partition("|")  # "bd:chi2=false|lm_coef=0": agent and trainer settings
    name, _, args = agent_spec.partition(":")
    tag = "".join(c if c.isalnum() or c in "=.-" else "_" for c in spec)
    run_dir = out / "runs" / f"{prefix}{tag}-seed{seed}"
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in trainer_args.split(",") if kv)}
    config = base.replace(agent=name, agent_config=args or None, seed=seed, out=str(run_dir), **overrides)
    key = run_key(config, store, agent_args=args)
    if key in store:
        return store[key]
    summary = build_trainer(config, teacher=teacher, progress=False).train()
    record = {
        "label": label,
        "spec": spec,
        "seed": seed,
        "steps": summary.steps,
        "wall_time_s": summary.wall_time_s,
        "train_time_s": summary.train_time_s,
        "history": [
            {"step": h.step, "train_time_s": h.train_time_s, "rougeL": h.metrics["eval/rougeL"]}
            for h in summary.history
        ],
        "test": summary.test.to_dict() if summary.test is not None else None,
        "outside_mass": summary.probe["outside_mass"],
        "mode_outside": summary.probe["mode_outside"],
    }
    store[key] = record
    write_json_atomic(out / "records.json", store)
    if not keep_checkpoints:  # keep events and summary; checkpoints of 40 runs would fill a disk
        drop_checkpoints(run_dir)
    last = record["test"]["last"]["eval/rougeL"]
    print(
        f"  {label} seed {seed}: test Rouge-L last {last:.2f}, outside mass {record['outside_mass']:.2f}, "
        f"{record['wall_time_s']:.0f} s",
        flush=True,
    )
    return record


def as_summary(record: dict, label: str) -> RunSummary:
    """A record as the :class:`~tdrl.training.RunSummary` :func:`tdrl.compare.results_table` reads, labelled
    ``label``: a run's record (its history holds validation Rouge-L alone), or a start row (a summary's
    dict, of this version or of tdrl 0.1)."""
    values = {**record, "label": label}
    values.setdefault("agent", record.get("spec", label))
    if "spec" in record:
        values["history"] = [
            {"step": h["step"], "train_time_s": h["train_time_s"], "metrics": {"eval/rougeL": h["rougeL"]}}
            for h in record["history"]
        ]
    return RunSummary.from_dict(values)


def table(rows: list[tuple[str, list[dict]]]) -> str:
    """:func:`tdrl.compare.results_table` over the records, each labelled with its row's name."""
    return results_table([as_summary(r, label) for label, records in rows for r in records])


def _stats(records: list[dict], which: str = "last") -> tuple[float, float]:
    values = np.array([r["test"][which]["eval/rougeL"] for r in records])
    return float(values.mean()), float(values.std())


def verdict(by_spec: dict[str, list[dict]], labels: dict[str, str], specs=TD) -> str:
    """Where every TD agent, and BD in particular, stands against SFT and KD on test Rouge-L of the
    last and of the best-validation model, beyond the seeds' spread or not."""

    def word(a, b):
        (ma, sa), (mb, sb) = a, b
        if abs(ma - mb) <= sa + sb:
            return f"{ma - mb:+.2f}: within the seed spread"
        return f"{ma - mb:+.2f}: {'above' if ma > mb else 'below'}"

    lines = []
    for which, name in (("last", "last model"), ("best", "best-validation model")):
        parts = []
        for spec in specs:
            parts.append(
                f"{labels[spec]} {_stats(by_spec[spec], which)[0]:.2f} ("
                + "; ".join(
                    f"vs {labels[b]} {word(_stats(by_spec[spec], which), _stats(by_spec[b], which))}" for b in BC
                )
                + ")"
            )
        lines.append(f"Test Rouge-L, {name}: " + ", ".join(parts) + ".")
    return (
        " ".join(lines)
        + " 'Within the seed spread' = the difference of means is no larger than the sum of the two standard "
        "deviations."
    )


def _best(records):
    """Mean over seeds of (best validation Rouge-L, training time to it, seconds per step)."""
    best = [max(r["history"], key=lambda h: h["rougeL"]) for r in records]
    return (
        float(np.mean([b["rougeL"] for b in best])),
        float(np.mean([b["train_time_s"] for b in best])),
        float(np.mean([r["train_time_s"] / r["steps"] for r in records])),
    )


def curve_section(curves: dict[str, list[dict]], annotate_s: float | None, out: Path) -> str:
    """Best validation Rouge-L, training time to reach it, and seconds per step, for BD against
    MiniLLM and against KD with the teacher online; the curve of seed 0 of each."""
    lines = [
        "| method | seeds | best validation Rouge-L | training time to best (s) | s/step |",
        "|---|---|---|---|---|",
    ]
    results = {label: _best(records) for label, records in curves.items()}
    for label, (rouge, t_best, per_step) in results.items():
        lines.append(f"| {label} | {len(curves[label])} | {rouge:.2f} | {t_best:.1f} | {per_step:.2f} |")
    (bd_label, (bd_r, bd_t, bd_s)), *others = results.items()
    text = []
    for label, (r, t, per) in others:
        if bd_t < t:
            faster = f"BD reaches its best {t / max(bd_t, 1e-9):.2f}x sooner"
        else:
            faster = f"BD reaches its best {bd_t / max(t, 1e-9):.2f}x later"
        compare_best = "higher" if bd_r > r else "lower"
        text.append(
            f"Against {label}: per step BD is {per / bd_s:.2f}x as fast ({bd_s:.2f} s against {per:.2f} s); {faster} "
            f"({bd_t:.1f} s against {t:.1f} s of training), and its best is {compare_best} ({bd_r:.2f} against "
            f"{r:.2f}), so 'sooner' compares " + ("the same or a better target." if bd_r >= r else "a lower target.")
        )
    if annotate_s is not None:
        text.append(
            f"BD's one-off cost, annotating the training data (top-K log-probs, one teacher forward per response), "
            f"took {annotate_s:.1f} s, amortised over every run and agent that reads the cache."
        )
    lines += [
        "",
        " ".join(text),
        "",
        "Validation Rouge-L against training time (evaluation excluded), seed 0:",
        "",
        "| method | step | training time (s) | validation Rouge-L |",
        "|---|---|---|---|",
    ]
    for label, records in curves.items():
        for h in records[0]["history"]:
            lines.append(f"| {label} | {h['step']} | {h['train_time_s']:.1f} | {h['rougeL']:.2f} |")
    _plot(curves, out / "rouge_vs_time.png")
    return "\n".join(lines)


def _plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, records), colour in zip(curves.items(), ("C0", "C1", "C2", "C3")):
        for i, r in enumerate(records):
            times, rouge = [h["train_time_s"] for h in r["history"]], [h["rougeL"] for h in r["history"]]
            ax.plot(times, rouge, marker="o", color=colour, alpha=0.8, label=label if i == 0 else None)
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("validation Rouge-L")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bundled_data(teacher, base: TrainConfig) -> Path:
    """The cached annotation of the bundled training prompts the runs of ``base`` read."""
    data = base.data
    return prepare_bundled_data(
        teacher,
        train_prompts=data.train_prompts,
        response_tokens=data.response_tokens,
        top_k=data.annotation_top_k,
        top_p=data.annotation_top_p,
        progress=False,
    )


def annotation_seconds(teacher, base: TrainConfig) -> float:
    """Time to annotate the cached training responses once more (into a throw-away directory)."""
    data_dir = bundled_data(teacher, base)
    responses = load_source(data_dir.parent / "responses")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        top_k, top_p = base.data.annotation_top_k, base.data.annotation_top_p
        annotate(teacher, responses, Path(tmp) / "a", top_k=top_k, top_p=top_p, progress=False)
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
    parser.add_argument("--only", nargs="+", help="run just these specs (e.g. bd 'bd|lm_coef=0'), print, and stop")
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
    recorded_before = {id(record) for record in store.values()}  # by identity: run_key may re-file a record
    if args.fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)
    started = time.perf_counter()
    base = base_config(budget, args.device, out)
    teacher = load_teacher(base.teacher, dtype=base.teacher_dtype, device=args.device)
    bundled_data(teacher, base)
    raw_student = base.student
    warm = None
    if budget["warm_start_steps"]:
        recipe = budget.get("warm_start") or {"warmup_steps": max(1, budget["warm_start_steps"] // 10)}
        warm_config = warm_start_config(base, budget["warm_start_steps"], budget["warm_start_lr"], recipe)
        path, warm = warm_start(warm_config, out / "warm-start", teacher=teacher, progress=False)
        base = base.replace(student=str(path))
    seeds = list(range(budget["seeds"]))
    run = lambda label, spec, seed: run_one(label, spec, seed, base, teacher, store, out, args.keep_checkpoints)  # noqa: E731

    main_rows, ablation_rows = budget.get("main", MAIN), budget.get("ablations", ABLATIONS)
    labels = {}
    for label, spec in main_rows + ablation_rows:
        labels.setdefault(spec, label)
    key = run_key(base, store, "start-", f"-seeds{len(seeds)}")  # the start sampled once per seed: its spread

    def start():
        if key not in store:
            rows = start_row(base.replace(out=str(out)), teacher, seeds=seeds)
            store[key] = [row.to_dict() for row in rows]
            write_json_atomic(out / "records.json", store)
        return [("warm start (no further training)" if warm else "start (no training)", store[key])]

    if args.only:  # these specs (seed by seed, so a partial call leaves every finished seed recorded)
        first = start()
        rows = {spec: [] for spec in args.only}
        for s in seeds:
            for spec in args.only:
                rows[spec].append(run(labels.get(spec, spec), spec, s))
        text = table(first + [(labels.get(spec, spec), records) for spec, records in rows.items()])
        (out / "results-only.md").write_text(text + "\n")
        print(text)
        return text
    start = start()
    by_spec: dict[str, list[dict]] = {}
    for label, spec in main_rows:
        by_spec[spec] = [run(label, spec, s) for s in seeds]
    if not args.no_ablations:
        for label, spec in ablation_rows:
            by_spec.setdefault(spec, [run(label, spec, s) for s in seeds])
    origin = (
        f"`{raw_student}` warm-started with full-vocabulary KD (bc:mode=kd) on the cached annotation for "
        f"{warm['steps']} steps at lr {budget['warm_start_lr']:g} ({warm['train_time_s']:.0f} s; validation Rouge-L "
        f"{warm['validation'].get('eval/rougeL', float('nan')):.2f}), the same starting checkpoint for every method"
        if warm
        else f"`{raw_student}`"
    )
    b = base.flat()
    sections = [
        f"Budget `{args.budget}` on {args.device}: teacher {b['teacher']}, student {origin}, "
        f"{b['train_prompts'] or 'all'} bundled training prompts x 1 teacher response of up to "
        f"{b['response_tokens']} tokens (K = 64, p = 0.8), {b['steps']} steps x batch {b['batch_size']} x "
        f"{b['grad_accum']} accumulated, lr {b['lr']:g}, AdamW ({b['adam_beta1']:g}, {b['adam_beta2']:g}) "
        f"({b['schedule']}, {b['warmup_steps']} warm-up), seeds {', '.join(map(str, seeds))}. Validation: "
        f"{b['eval_prompts']} prompts every {b['eval_every']} steps; test: {b['test_prompts']} "
        f"{base.test.split_name} prompts, sampling seeds {','.join(map(str, base.test_seeds))}, last and "
        f"best-validation model, sampling top-p 0.8 / T = 1 (no top-k cap), {b['eval_max_new_tokens']} new tokens.",
        "",
        table(start + [(label, by_spec[spec]) for label, spec in main_rows]),
        verdict(by_spec, labels, [spec for _, spec in main_rows if spec in TD or spec.startswith("bd")]),
    ]
    if not args.no_ablations:
        ablation_table = table(start + [(label, by_spec[spec]) for label, spec in ablation_rows])
        sections += ["", "**Ablations of BD** (same budget and seeds):", "", ablation_table]
    if not args.no_curve:
        online = [run(ONLINE[0], ONLINE[1], s) for s in range(budget["curve_seeds"])]
        key = run_key(base, store, "annotation-")
        if key not in store:
            store[key] = annotation_seconds(teacher, base)
            write_json_atomic(out / "records.json", store)
        bd = budget.get("curve_bd", "bd")
        curves = {"BD (cached annotation)": by_spec[bd], "MiniLLM": by_spec["minillm"], ONLINE[0]: online}
        title = "**Time to quality: BD against MiniLLM and against KD with the teacher online**"
        sections += ["", title, "", curve_section(curves, store[key], out)]
    if warm:
        raw_base = base.replace(student=raw_student)
        raw = [
            (label, run_one(label, spec, 0, raw_base, teacher, store, out, prefix="raw-"))
            for label, spec in (("BD", "bd"), ONLINE)
        ]
        sections += [
            "",
            f"**Without the warm start** (from the raw `{raw_student}`, seed 0, same steps): test Rouge-L "
            + "; ".join(f"{label} {r['test']['last']['eval/rougeL']:.2f}" for label, r in raw)
            + ". Validation Rouge-L along the run: "
            + "; ".join(f"{label} " + ", ".join(f"{h['rougeL']:.1f}" for h in r["history"]) for label, r in raw)
            + ". The top-p MDP can only shape a student that already decodes.",
        ]
    elapsed = time.perf_counter() - started
    reused = [r for r in store.values() if id(r) in recorded_before and isinstance(r, dict) and "spec" in r]
    line = f"Reproduction wall time: {elapsed:.0f} s"
    if reused:  # say what the table cost, not what this call cost
        seconds = sum(r["wall_time_s"] for r in reused)
        line += (
            f"; {len(reused)} runs were recorded by an earlier call and reused (their training runs took "
            f"{seconds:.0f} s of wall time, test scoring not counted)"
        )
    sections += ["", line + f" (finished runs are recorded in {out}/records.json and reused)."]
    text = "\n".join(sections)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
