"""The ``tdrl`` command line. Errors tdrl raises on purpose print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tdrl.errors import TdrlError

#: A few instruction prompts for quick statistics before any data set is loaded.
SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Rewrite this sentence in the past tense: I walk to school every day.",
    "If Tom has 5 apples and eats 2, how many apples does he have left?",
    "Define the word 'photosynthesis' in one sentence.",
    "Summarize in a few words: The meeting was moved from Monday to Friday because the room was booked.",
    "Explain what this Python code does: print(sum(range(10)))",
    "Is the following review positive or negative? 'I loved every minute of this film.'",
)


def _add_teacher_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher",
        default="bundled",
        help="'bundled' (SmolLM2-135M-Instruct, default), 'tiny', a local directory or a hub id",
    )
    parser.add_argument("--dtype", default="float32", help="teacher dtype: float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="torch device for the teacher, e.g. cpu or cuda")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a hub model's own code to run (off by default)",
    )


def cmd_teacher_info(args: argparse.Namespace) -> int:
    from tdrl.teachers import load_teacher, sparsity_statistics

    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    prompts = list(SAMPLE_PROMPTS[: args.num_prompts])
    responses = teacher.generate(prompts, args.max_new_tokens, temperature=1.0, top_p=0.8, seed=args.seed)
    stats = sparsity_statistics(teacher, prompts, responses, top_ps=args.top_p, top_ks=args.top_k)
    print(f"teacher        {teacher.name}")
    print(f"vocab size     {teacher.vocab_size}")
    print(f"parameters     {teacher.num_parameters():,}")
    print(
        f"states         {int(stats['states'])} response positions of {len(prompts)} sampled teacher responses "
        f"(temperature 1, top-p 0.8, seed {args.seed})"
    )
    print("\ntop-p set A_p(s): mean size | mean teacher mass inside")
    print("   k      p     size     mass")
    for k in args.top_k:
        for p in args.top_p:
            print(f"{k:4d}  {p:5.2f}  {stats[f'size@k{k}p{p}']:7.2f}  {stats[f'mass@k{k}p{p}']:7.3f}")
    print(f"\nmass of the teacher's top-7 tokens: {stats['top7_mass']:.3f}; top-50: {stats['top50_mass']:.3f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.teacher, args.dtype, args.device, args.trust_remote_code = "bundled", "float32", "cpu", False
    return cmd_teacher_info(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdrl", description="LM distillation as offline RL on the top-p token MDP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_stats_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="nucleus masses p")
        p.add_argument("--top-k", type=int, nargs="+", default=[64, 256], help="candidate caps k")
        p.add_argument("--num-prompts", type=int, default=8, help=f"sample prompts to use (max {len(SAMPLE_PROMPTS)})")
        p.add_argument("--max-new-tokens", type=int, default=48, help="teacher response length per prompt")
        p.add_argument("--seed", type=int, default=0)

    info = sub.add_parser("teacher-info", help="vocabulary, size and top-p sparsity of a teacher")
    _add_teacher_args(info)
    add_stats_args(info)
    info.set_defaults(func=cmd_teacher_info)

    demo = sub.add_parser("demo", help="the main job on the bundled default teacher")
    add_stats_args(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        from tdrl.actions import validate_top_k, validate_top_p

        for p in getattr(args, "top_p", []) or []:
            validate_top_p(p)
        for k in getattr(args, "top_k", []) or []:
            validate_top_k(k)
        return args.func(args)
    except (TdrlError, ValueError) as exc:
        print(f"tdrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tdrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
