"""The warm start's cost against how well it writes, on prompts no training template produced.

    python -m benchmarks.warm_start_curve                      # the recipe, 384 steps, ~15 min on 2 cores
    python -m benchmarks.warm_start_curve --baseline DIR       # also score an older warm start (DIR)

One warm start (:data:`tdrl.training.warmstart.RECIPE`: a constant learning rate after a fixed warm-up,
so the model at step S of this run *is* the S-step warm start) evaluated every ``--eval-every`` steps on
the last ``--eval-prompts`` prompts of the bundled ``heldout`` split (the demo and the reproduction
test on its first ones): Rouge-L against the teacher's greedy answer (sampled, top-p 0.8 / T = 1,
and greedy), against the human references, the student's entropy, and at the states of its own samples
its mass outside the teacher's A_p(s) and how often its mode lies outside A_p(s). Step 0 is the raw
layer cut. The issue's targets: mode inside A_p(s) at >= 80% of states (mode outside <= 0.20), outside
mass <= 0.45, greedy Rouge-L >= 2x that of the old demo warm start, samples that read as English.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tdrl.evaluation import EvalConfig, evaluate, reference_records
from tdrl.integrity import write_json_atomic
from tdrl.models import load_student, load_teacher
from tdrl.training import TrainConfig
from tdrl.training.warmstart import RECIPE, warm_start

KEYS = (
    ("sampled", "eval/rougeL"),
    ("greedy", "eval/rougeL_greedy"),
    ("vs human", "eval/rougeL_reference"),
    ("entropy", "eval/entropy"),
    ("outside mass", "eval/outside_mass"),
    ("mode outside", "eval/mode_outside"),
)


def curve_config(steps: int, out: Path, eval_prompts: int, student: str | None = None) -> TrainConfig:
    """The recipe, scored on the LAST ``eval_prompts`` held-out prompts: the demo and the reproduction
    test on the first ones, so the recipe is not chosen on the prompts it is tested on. The trainer does
    not evaluate the starting student (the raw cut is scored apart: :func:`score_raw`)."""
    values = dict(RECIPE, student=student or RECIPE["student"])
    values.update(
        teacher="bundled",
        data="bundled",
        steps=steps,
        eval_data="bundled",
        eval_split=f"heldout[-{eval_prompts}:]",
        eval_prompts=eval_prompts,
        eval_max_new_tokens=32,
        eval_seeds=[0],
        eval_also_greedy=True,
        eval_on_start=False,
        checkpoint_every=max(steps // 4, 1),
        log_every=16,
        out=str(out),
    )
    return TrainConfig.from_dict(values)


def score(model_dir: str, teacher, config: TrainConfig) -> tuple[dict, list]:
    student = load_student(model_dir, teacher=teacher)
    records = reference_records(
        teacher, config.eval.data, split=config.eval.split, n=config.eval.prompts, max_new_tokens=32
    )
    eval_config = EvalConfig(max_new_tokens=32, seeds=[0], also_greedy=True)
    return evaluate(student.model, student.tokenizer, teacher, records, eval_config)


def table(rows: list[dict]) -> str:
    lines = [
        "| student | steps | training time (s) | " + " | ".join(k for k, _ in KEYS) + " |",
        "|---|---|---|" + "---|" * len(KEYS),
    ]
    for r in rows:
        cells = [f"{r['metrics'].get(key, float('nan')):.2f}" for _, key in KEYS]
        lines.append(f"| {r['label']} | {r['step']} | {r['train_time_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=384)
    parser.add_argument("--eval-every", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--student", default=None, help="default: the recipe's 16-layer cut")
    parser.add_argument("--baseline", action="append", default=[], help="LABEL=DIR of another warm start to score")
    parser.add_argument("--out", default="runs/warm-start-curve")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = curve_config(args.steps, out / "warm-start", args.eval_prompts, args.student)
    teacher = load_teacher("bundled", dtype=config.teacher_dtype)
    rows = []
    for spec in args.baseline:
        label, _, where = spec.partition("=")
        rows.append(
            {"label": label, "step": "-", "train_time_s": float("nan"), "metrics": score(where, teacher, config)[0]}
        )
    raw, samples = score_raw(teacher, config)
    rows.append({"label": f"raw `{config.student}`", "step": 0, "train_time_s": 0.0, "metrics": raw})
    started = time.perf_counter()
    path, record = warm_start(config, out / "warm-start", teacher=teacher, eval_every=args.eval_every, overwrite=True)
    wall = time.perf_counter() - started
    for h in record.get("history", []):  # a warm start reused from before histories were recorded has none
        rows.append(
            {"label": "warm start", "step": h["step"], "train_time_s": h["train_time_s"], "metrics": h["metrics"]}
        )
    text = table(rows) + f"\n\nWall time of the warm start (training, evaluation, export): {wall:.0f} s."
    write_json_atomic(out / "curve.json", {"rows": rows, "record": record})
    (out / "curve.md").write_text(text + "\n")
    print(text)
    final = load_student(str(path), teacher=teacher)
    records = reference_records(teacher, config.eval.data, split=config.eval.split, n=6, max_new_tokens=32)
    _, samples = evaluate(
        final.model, final.tokenizer, teacher, records, EvalConfig(max_new_tokens=32, seeds=[0], samples=6)
    )
    print(json.dumps(samples, indent=1))
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    return text


def score_raw(teacher, config: TrainConfig):
    """The raw layer cut (step 0) under the same protocol."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        student = load_student(config.student, teacher=teacher)
        student.save_pretrained(tmp)
        return score(tmp, teacher, config)


if __name__ == "__main__":
    main()
