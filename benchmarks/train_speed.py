"""Training step speed and peak memory of every agent against two baselines.

Same student, same batch, same process (speed) and a fresh process per configuration (memory):

* **default** (tdrl): the agent in its default mode on a cached teacher annotation: logits on A_p(s)
  (``Student.subset_logits``) and the exact full-vocabulary normaliser computed in vocabulary chunks
  (``vocab_logsumexp``: no ``[N, V]`` tensor); the teacher is not loaded at all;
* **set** (ablation): the same agent with ``restrict="set"``, the set-only normaliser (no
  full-vocabulary pass: the floor of what the sparse path costs, and the mode that loses the support);
* **full-V** (ablation): ``restrict="none"``: ``[N, V]`` logits, every sum over the whole vocabulary;
* **baseline** (what distillation code does today, TRL's GKD trainer with lambda = 0): ``kd-online``,
  the teacher run on every batch, full student logits, full-vocabulary forward KL;
* **HF SFT**: a bare Hugging Face step, ``model(input_ids, labels=...)`` with labels on the response
  tokens: the floor for any method that normalises the student over the whole vocabulary.

Vocabulary sizes: 49,152 (the bundled SmolLM2-135M-Instruct) and 8,192 (the same architecture with an
8K BPE vocabulary, :mod:`benchmarks.vocab8k`). Student: a subset of the teacher's layers.

    python -m benchmarks.train_speed --teacher bundled vocab8k --student layers:0,10,20,29
    python -m benchmarks.train_speed --teacher tiny --student tiny --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.memory import PeakMemory
from tdrl.agents import make_agent
from tdrl.data import collate, load_source
from tdrl.models import bundled_teacher_dir, load_student, load_teacher
from tdrl.records import annotated_record, record_tensors

AGENTS = ["bc", "sql", "cql", "iql", "iqlearn", "bd", "gkd", "minillm"]
BASELINE = "kd-online"
HF_SFT = "hf-sft"
VARIANTS = {"": {}, "set": {"restrict": "set"}, "full": {"restrict": "none"}}


def get_teacher(name: str, device: str = "cpu"):
    if name == "vocab8k":
        from benchmarks import vocab8k

        return vocab8k.load().to(device)
    return load_teacher(name, device=device)


def teacher_path(name: str) -> str:
    """A name a child process can load the teacher from without rebuilding it."""
    if name == "vocab8k":
        from benchmarks import vocab8k

        return str(vocab8k.teacher_dir())
    return str(bundled_teacher_dir()) if name == "bundled" else name


def annotated_batch(teacher, batch_size: int, response_tokens: int, top_k: int, top_p: float):
    """A real batch: bundled prompts, each followed by another prompt's text as the response."""
    rows = load_source("bundled", split="train").select(range(2 * batch_size)).to_list()
    items = []
    for i in range(batch_size):
        prompt_ids = teacher.encode_prompt(rows[i]["prompt"])
        text = " ".join(r["prompt"] for r in rows[batch_size:])
        response_ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"][i : i + response_tokens]
        ids = torch.tensor([prompt_ids + response_ids])
        ann = teacher.annotate(ids, top_k=top_k, top_p=top_p)
        items.append(record_tensors(annotated_record(ann, 0, prompt_ids, response_ids, terminated=False)))
    return collate(items, teacher.pad_token_id)


class HFStep(torch.nn.Module):
    """A bare Hugging Face SFT step: ``model(input_ids, attention_mask, labels)`` with labels on the
    response tokens (``-100`` elsewhere); the model computes ``[B, T, V]`` logits and the loss."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, batch):
        device = self.student.device
        ids = batch["input_ids"].to(device)
        labels = torch.full_like(ids, -100)
        sel = batch["response_mask"].to(device)
        labels[:, 1:][sel[:, :-1]] = ids[:, 1:][sel[:, :-1]]
        out = self.student.model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), labels=labels)
        return out.loss, {}

    def after_update(self):
        pass


def make(name: str, student, teacher=None):
    """The module a configuration trains: ``bc`` (default), ``bc/set``, ``bc/full``, ``kd-online``, ``hf-sft``."""
    if name == HF_SFT:
        return HFStep(student)
    agent_name, _, variant = name.partition("/")
    return make_agent(agent_name, student, teacher=teacher, **VARIANTS[variant])  # kd-online runs the teacher


def stepper(agent, batch, after_update: bool = True, mixed_precision: str = "no"):
    """One training step (loss + backward + AdamW, then ``agent.after_update()``) as a closure; with
    ``mixed_precision="bf16"`` the forward runs under bfloat16 autocast (what ``--mixed-precision bf16``
    does in the trainer)."""
    import contextlib

    optimiser = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=1e-5)
    device_type = next(agent.parameters()).device.type
    cast = (
        (lambda: torch.autocast(device_type, dtype=torch.bfloat16))
        if mixed_precision == "bf16"
        else contextlib.nullcontext
    )

    def step():
        with cast():
            loss, _ = agent(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if after_update:
            agent.after_update()

    return step


def train_steps(agent, batch, steps: int, device: str = "cpu", mixed_precision: str = "no") -> float:
    """Seconds for ``steps`` optimiser steps (loss + backward + AdamW) after one warm-up step."""
    step = stepper(agent.to(device), batch, mixed_precision=mixed_precision)
    step()  # warm-up: allocates the optimiser state
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- memory (one process each)
def worker(spec: dict) -> dict:
    """Run in a fresh process: load the student (and the teacher only if the configuration needs it),
    run one warm-up step, then measure the peak memory of one more step above that level."""
    device = spec["device"]
    student = load_student(spec["student"]).to(device)
    batch = torch.load(spec["batch"], weights_only=True)
    teacher = get_teacher(spec["teacher"], device) if spec["config"] == BASELINE else None
    step = stepper(
        make(spec["config"], student, teacher).to(device),
        batch,
        after_update=False,
        mixed_precision=spec["mixed_precision"],
    )
    step()
    with PeakMemory(device) as peak:
        step()
    return {"step_peak_mb": peak.peak_bytes / 2**20}


def measure_memory(
    config: str, teacher: str, student_dir: str, batch_path: str, device: str, mixed_precision: str = "no"
) -> float:
    spec = {
        "config": config,
        "teacher": teacher,
        "student": student_dir,
        "batch": batch_path,
        "device": device,
        "mixed_precision": mixed_precision,
    }
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_speed", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory worker for {config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["step_peak_mb"]


# ---------------------------------------------------------------------------- one vocabulary
def model_flops_per_step(student, batch) -> float:
    """Model FLOPs of one training step (forward + backward, the usual 6 per multiply-add weight per
    token): the trunk's matmul weights on every real token, the LM head's V x H on every response state.
    Recomputation (the chunked normaliser's backward) is not counted: this is what the step must do."""
    trunk = sum(
        p.numel()
        for n, p in student.model.named_parameters()
        if p.dim() == 2 and "embed" not in n and "lm_head" not in n
    )
    head = student.vocab_size * student.model.config.hidden_size
    return 6.0 * (trunk * float(batch["attention_mask"].sum()) + head * float(batch["response_mask"].sum()))


def measure(
    teacher_name: str,
    student_name: str,
    agents: list[str],
    steps: int,
    batch_size: int,
    response_tokens: int,
    device: str,
    memory: bool,
    mixed_precision: str = "no",
) -> dict:
    teacher = get_teacher(teacher_name, device)
    batch = annotated_batch(teacher, batch_size, response_tokens, top_k=64, top_p=0.8)
    tokens = int(batch["response_mask"].sum())
    configs = [BASELINE, HF_SFT] + agents + [f"{a}/set" for a in agents] + [f"{a}/full" for a in agents]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        load_student(student_name, teacher=teacher).save_pretrained(Path(tmp) / "student")
        torch.save(batch, Path(tmp) / "batch.pt")
        for config in configs:
            torch.manual_seed(0)
            student = load_student(str(Path(tmp) / "student"))
            flops = model_flops_per_step(student, batch)
            seconds = train_steps(make(config, student, teacher), batch, steps, device, mixed_precision)
            rows[config] = {"tokens_per_s": steps * tokens / seconds, "tflops": steps * flops / seconds / 1e12}
            if memory:
                rows[config]["step_peak_mb"] = measure_memory(
                    config,
                    teacher_path(teacher_name),
                    str(Path(tmp) / "student"),
                    str(Path(tmp) / "batch.pt"),
                    device,
                    mixed_precision,
                )
    shape = tuple(batch["input_ids"].shape)
    return {
        "teacher": teacher_name,
        "vocab": teacher.vocab_size,
        "student": student_name,
        "shape": shape,
        "tokens": tokens,
        "rows": rows,
        "agents": agents,
        "mixed_precision": mixed_precision,
    }


def table(result: dict) -> str:
    rows, memory = result["rows"], "step_peak_mb" in result["rows"][BASELINE]
    base, sft = rows[BASELINE], rows[HF_SFT]
    b, t = result["shape"]
    mb = lambda row: f", step peak {row['step_peak_mb']:.0f} MB" if memory else ""  # noqa: E731
    lines = [
        f"**Vocabulary {result['vocab']:,}** (teacher {result['teacher']}, student {result['student']}); "
        f"batch {b} x {t} tokens, {result['tokens']} response tokens per step, K = 64, p = 0.8. Baselines: "
        f"`kd-online` (teacher online, full-vocabulary forward KL) {base['tokens_per_s']:.0f} tokens/s{mb(base)}; "
        f"bare HF SFT step {sft['tokens_per_s']:.0f} tokens/s{mb(sft)}. Targets for each default: >= 2x "
        "kd-online's tokens/s, <= 1/3 of its step memory, <= 1.3x the HF SFT step's time. Mixed precision: "
        f"{result.get('mixed_precision', 'no')}; model TFLOP/s counts the student step's matmuls "
        "(`model_flops_per_step`).",
        "",
    ]
    head = (
        "| agent | default tok/s | model TFLOP/s | vs kd-online | step time vs HF SFT | set-only tok/s | full-V tok/s |"
    )
    rule = "|---|---|---|---|---|---|---|"
    if memory:
        head += " default peak MB | set-only MB | full-V MB | memory, default / kd-online | targets met |"
        rule += "---|---|---|---|---|"
    lines += [head, rule]
    for agent in result["agents"]:
        default, only_set, full = rows[agent], rows[f"{agent}/set"], rows[f"{agent}/full"]
        speed = default["tokens_per_s"] / base["tokens_per_s"]
        time_ratio = sft["tokens_per_s"] / default["tokens_per_s"]
        cells = [
            agent,
            f"{default['tokens_per_s']:.0f}",
            f"{default['tflops']:.3g}",
            f"{speed:.2f}x",
            f"{time_ratio:.2f}x",
            f"{only_set['tokens_per_s']:.0f}",
            f"{full['tokens_per_s']:.0f}",
        ]
        if memory:
            share = default["step_peak_mb"] / max(base["step_peak_mb"], 1e-9)
            met = [speed >= 2.0, share <= 1 / 3, time_ratio <= 1.3]
            missed = [n for n, ok in zip(("speed", "memory", "vs SFT"), met) if not ok]
            cells += [
                f"{default['step_peak_mb']:.0f}",
                f"{only_set['step_peak_mb']:.0f}",
                f"{full['step_peak_mb']:.0f}",
                f"{share:.2f}",
                f"{sum(met)}/3" + (f" ({', '.join(missed)} missed)" if missed else ""),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="+", default=["bundled", "vocab8k"], help="bundled, vocab8k, tiny, ...")
    parser.add_argument("--student", default="layers:0,10,20,29")
    parser.add_argument("--agents", nargs="+", default=AGENTS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="bf16 autocast of the step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return ""
    out = []
    for name in args.teacher:
        student = "tiny" if name == "tiny" else args.student
        result = measure(
            name,
            student,
            args.agents,
            args.steps,
            args.batch_size,
            args.response_tokens,
            args.device,
            not args.no_memory,
            args.mixed_precision,
        )
        out.append(table(result))
        print(out[-1], flush=True)
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
