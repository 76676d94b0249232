"""The comparison subcommands, ``tdrl compare`` and ``tdrl demo`` (the main job), and their defaults."""

from __future__ import annotations

import argparse

from tdrl.commands import _config
from tdrl.errors import ConfigError

__all__ = ["cmd_compare", "cmd_demo", "DEMO_DEFAULTS", "DEMO_AGENTS", "DEMO_SEEDS", "COMPARE_AGENTS"]

#: The demo: the recipe's warm start (cached in runs/demo/warm-start), then the paper's agents from it,
#: validated on bundled validation prompts and tested on the hand-written held-out prompts, which no
#: training template produced. bf16 teacher and autocast: the CPU's fast path.
DEMO_DEFAULTS = {
    "teacher": "bundled",
    "teacher_dtype": "bfloat16",
    "mixed_precision": "bf16",
    "student": "layers:0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,29",
    "data": "bundled",
    "train_prompts": 0,
    "response_tokens": 40,
    "steps": 32,
    "lr": 2e-5,
    "warmup_steps": 3,
    "eval_every": 16,
    "eval_prompts": 16,
    "eval_split": "validation",
    "eval_max_new_tokens": 32,
    "test_prompts": 48,
    "test_split": "heldout",
    "checkpoint_every": 32,
    "log_every": 4,
    "out": "runs/demo",
}
DEMO_AGENTS = "sft,bd,bd-released"
DEMO_SEEDS = 2
#: ``tdrl compare``'s default agents: the six offline agents.
COMPARE_AGENTS = "bc,sql,iql,iqlearn,cql,bd"


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tdrl.integrity import DirectoryLock

    config = _config(args, agent=False)
    with DirectoryLock(Path(config.out), "comparison directory"):  # a second comparison into --out is refused
        return _compare(config, args.agents, args.seeds)


def _compare(config, agents: str, seeds: int, start: str = "start", teacher=None, command: str = "compare") -> int:
    """Run the comparison: seeds ``--seed`` .. ``--seed + N - 1`` (default 0 .. N-1)."""
    from pathlib import Path

    from tdrl.compare import CURVES_PNG, RESULTS_CSV, RESULTS_MD, compare, results_table, split_agent_specs

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(config.out)
    seed_list = list(range(config.seed, config.seed + seeds))
    summaries = compare(
        split_agent_specs(agents), seed_list, config, out, start=start, teacher=teacher, command=command, locked=True
    )
    print(results_table(summaries))
    print(f"results: {out / RESULTS_MD}, {out / RESULTS_CSV}, {out / CURVES_PNG}")
    print(f"TensorBoard: tdrl tensorboard {out / 'runs'}   (then open http://127.0.0.1:6006/)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tdrl.compare import written_by
    from tdrl.integrity import DirectoryLock
    from tdrl.models import load_teacher
    from tdrl.training.config import resolve_device
    from tdrl.training.warmstart import warm_start, warm_start_config

    start = time.perf_counter()
    config = _config(args, agent=False)
    steps = args.warm_start_steps
    warm = warm_start_config(config, steps, args.warm_start_lr)
    out = Path(config.out)
    with DirectoryLock(out, "comparison directory"):  # the warm start and the comparison, one demo at a time
        there = written_by(out)
        if there not in (None, "demo") and not config.overwrite:  # before the warm start trains
            raise ConfigError(
                f"{out} already holds a `tdrl {there}` comparison: choose another --out, or --overwrite to replace it"
            )
        print(
            f"warm start: {steps} steps of full-vocabulary KD of {config.student} (reused when cached) ...", flush=True
        )
        # one teacher (and one hash of its weights) for the warm start and the comparison
        device, device_map = resolve_device(config.device), config.teacher_device_map
        teacher = load_teacher(config.teacher, dtype=config.teacher_dtype, device=device, device_map=device_map)
        path, record = warm_start(warm, out / "warm-start", teacher=teacher)
        print(f"warm start ready in {path} ({record['train_time_s']:.0f} s of training)", flush=True)
        status = _compare(
            config.replace(student=str(path)),
            args.agents or DEMO_AGENTS,
            args.seeds,
            start="warm start",
            teacher=teacher,
            command="demo",
        )
    print(f"demo wall time: {time.perf_counter() - start:.0f} s")
    return status
