"""Step memory and speed of bigger-student training: gradient checkpointing and LoRA, with and without each.

Same student, same annotated batch (the bundled teacher's, V = 49,152), one agent at a time, against the
**baseline** of the same invocation: every weight trained, no checkpointing. The configurations:

* ``full``: every weight trains (AdamW state for all of them), activations kept;
* ``gc``: ``--gradient-checkpointing`` (each decoder layer recomputed in backward);
* ``lora``: ``--lora-rank 16 --lora-alpha 32`` on every linear layer but the LM head (peft's
  ``all-linear``): only the adapters (and the agent's heads) train;
* ``lora+gc``: both;
* ``lora+head``: LoRA on the LM head too (the tied 49,152-row output embedding): the normaliser reads
  its effective weight ``W + BA``, materialised per use.

Memory, one fresh process per configuration (:mod:`benchmarks.memory`): **resident** = the process's RSS
after one warm-up step (weights, AdamW state, the batch; the freed pages of the allocator's pools returned
to the OS first, glibc's ``malloc_trim``) minus its RSS before the student was loaded; **step peak** = the
peak RSS of one more step above that level (activations, gradients, the step's
temporaries; ``max_memory_allocated`` on CUDA). Speed: loss + backward + AdamW, the median of ``--steps``
steps after a warm-up step, every configuration in this process on the same batch, timed in rounds (one step
of each configuration per round). Ratios are against ``full``.

    python -m benchmarks.bigger_students                        # layers:0,10,20,29 and a 16-layer cut
    python -m benchmarks.bigger_students --teacher tiny --student tiny --steps 1 --no-memory
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.memory import PeakMemory, rss_bytes
from benchmarks.train_speed import annotated_batch, get_teacher, make, stepper

#: configuration -> (LoRA settings or None, gradient checkpointing)
CONFIGS = {
    "full": (None, False),
    "gc": (None, True),
    "lora": ({"rank": 16, "alpha": 32.0, "target_modules": "all-linear"}, False),
    "lora+gc": ({"rank": 16, "alpha": 32.0, "target_modules": "all-linear"}, True),
    "lora+head": ({"rank": 16, "alpha": 32.0, "target_modules": "HEAD"}, False),
}
BASELINE = "full"
SIXTEEN = "layers:0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,29"  # the warm-start recipe's student


def build(student_dir: str, config: str):
    """The student of a configuration: loaded from ``student_dir``, then adapted as ``tdrl train`` would."""
    from tdrl.models import load_student
    from tdrl.models.lora import apply_lora

    lora, checkpointing = CONFIGS[config]
    student = load_student(student_dir)
    if lora is not None:
        settings = dict(lora)
        if settings["target_modules"] == "HEAD":  # every linear layer of the trunk, and the head
            settings["target_modules"] = ",".join(_trunk_linear_names(student.model) + ["lm_head"])
        torch.manual_seed(0)
        apply_lora(student, **settings)
    if checkpointing:
        student.enable_gradient_checkpointing()
    return student


def _trunk_linear_names(model) -> list[str]:
    head = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    if not names:  # GPT-2's Conv1D layers
        names = {"c_attn", "c_proj", "c_fc"}
    return sorted(names)


def _trim() -> None:
    """glibc's ``malloc_trim(0)``: free pages of the allocator's pools go back to the OS (elsewhere: nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _import_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        pass


def trainable_millions(agent) -> float:
    return sum(p.numel() for p in agent.parameters() if p.requires_grad) / 1e6


def worker(spec: dict) -> dict:
    """In a fresh process: the resident memory after a warm-up step, and one more step's peak above it."""
    device = spec["device"]
    batch = torch.load(spec["batch"], weights_only=True)
    _import_peft()  # its modules are not the student's memory: resident before the student, in every configuration
    before = rss_bytes()
    agent = make(spec["agent"], build(spec["student"], spec["config"])).to(device)
    step = stepper(agent, batch, after_update=True)
    step()
    _trim()  # the warm-up step's freed activations back to the OS: resident is what stays allocated
    resident = rss_bytes() - before
    with PeakMemory(device) as peak:
        step()
    return {"resident_mb": resident / 2**20, "step_peak_mb": peak.peak_bytes / 2**20}


def measure_memory(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bigger_students", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory worker for {spec['config']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    teacher_name: str,
    student_name: str,
    agents: list[str],
    steps: int,
    batch_size: int,
    response_tokens: int,
    device: str,
    memory: bool,
) -> dict:
    from tdrl.models import load_student

    _import_peft()  # imported before any timing
    teacher = get_teacher(teacher_name, device)
    batch = annotated_batch(teacher, batch_size, response_tokens, top_k=64, top_p=0.8)
    tokens = int(batch["response_mask"].sum())
    rows: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        load_student(student_name, teacher=teacher).save_pretrained(Path(tmp) / "student")
        torch.save(batch, Path(tmp) / "batch.pt")
        student_dir = str(Path(tmp) / "student")
        for agent_name in agents:
            # every configuration built at once and timed in rounds, one step of each per round (the median
            # of its rounds): on a shared machine the load moves over minutes, and rounds spread it evenly
            agents_by_config = {c: make(agent_name, build(student_dir, c)).to(device) for c in CONFIGS}
            steppers = {c: stepper(a, batch) for c, a in agents_by_config.items()}
            times: dict[str, list[float]] = {c: [] for c in CONFIGS}
            for round_ in range(steps + 1):  # round 0 warms up (allocates the optimiser state)
                for config, step in steppers.items():
                    start = time.perf_counter()
                    step()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if round_:
                        times[config].append(time.perf_counter() - start)
            rows[agent_name] = {}
            for config, agent in agents_by_config.items():
                seconds = statistics.median(times[config])
                rows[agent_name][config] = {
                    "step_s": seconds,
                    "tokens_per_s": tokens / seconds,
                    "trainable_m": trainable_millions(agent),
                }
            del agents_by_config, steppers
            for config, row in rows[agent_name].items():
                if memory:
                    spec = {"agent": agent_name, "config": config, "student": student_dir, "device": device}
                    row.update(measure_memory({**spec, "batch": str(Path(tmp) / "batch.pt")}))
                print(agent_name, config, {k: round(v, 2) for k, v in row.items()}, flush=True)
    return {
        "teacher": teacher_name,
        "vocab": teacher.vocab_size,
        "student": student_name,
        "shape": tuple(batch["input_ids"].shape),
        "tokens": tokens,
        "rows": rows,
    }


def table(result: dict) -> str:
    b, t = result["shape"]
    memory = "step_peak_mb" in next(iter(result["rows"].values()))[BASELINE]
    lines = [
        f"**Student {result['student']}** (teacher {result['teacher']}, V = {result['vocab']:,}); batch {b} x {t} "
        f"tokens, {result['tokens']} response tokens per step; float32. Ratios against `{BASELINE}` (every weight "
        "trained, no checkpointing) of the same agent.",
        "",
    ]
    head = "| agent | configuration | trainable M | step s | step time / full |"
    rule = "|---|---|---|---|---|"
    if memory:
        head += " resident MB | step peak MB | step peak / full | resident + peak MB | total / full |"
        rule += "---|---|---|---|---|"
    lines += [head, rule]
    for agent, configs in result["rows"].items():
        base = configs[BASELINE]
        for config, row in configs.items():
            cells = [agent, f"`{config}`", f"{row['trainable_m']:.2f}", f"{row['step_s']:.2f}"]
            cells.append(f"{row['step_s'] / base['step_s']:.2f}x")
            if memory:
                total, base_total = row["resident_mb"] + row["step_peak_mb"], base["resident_mb"] + base["step_peak_mb"]
                cells += [
                    f"{row['resident_mb']:.0f}",
                    f"{row['step_peak_mb']:.0f}",
                    f"{row['step_peak_mb'] / max(base['step_peak_mb'], 1e-9):.2f}",
                    f"{total:.0f}",
                    f"{total / max(base_total, 1e-9):.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="bundled", help="bundled (V = 49,152), vocab8k or tiny")
    parser.add_argument("--student", nargs="+", default=["layers:0,10,20,29", SIXTEEN])
    parser.add_argument("--agents", nargs="+", default=["bc", "sql"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (rounds) after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return ""
    out = []
    for student in args.student:
        result = measure(
            args.teacher,
            student,
            args.agents,
            args.steps,
            args.batch_size,
            args.response_tokens,
            args.device,
            not args.no_memory,
        )
        out.append(table(result))
        print(out[-1], flush=True)
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
