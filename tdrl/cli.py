"""The ``tdrl`` command line: the parser and the error policy (errors from bad input print one line and
exit with status 2; ``--debug`` shows the traceback). The subcommands live in :mod:`tdrl.commands`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tdrl.commands import (
    DEMO_AGENTS,
    DEMO_DEFAULTS,
    DEMO_SEEDS,
    SAMPLE_PROMPTS,
    WARM_START_STEPS,
    cmd_agents,
    cmd_annotate,
    cmd_compare,
    cmd_demo,
    cmd_eval,
    cmd_generate_responses,
    cmd_teacher_info,
    cmd_tensorboard,
    cmd_train,
    cmd_warm_start,
    warm_start_defaults,
)
from tdrl.errors import TdrlError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdrl", description="LM distillation as offline RL on the top-p token MDP.")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (anywhere on the line)"
    )
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

    def add_source_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--source",
            default="bundled",
            help="'bundled', 'dolly', a .jsonl/.json/.csv file, a generate-responses directory, "
            "a save_to_disk directory or a hub data set id",
        )
        p.add_argument(
            "--split",
            default=None,
            help="split to read (bundled: train, validation, test or heldout; default: the template splits)",
        )
        p.add_argument("--prompt-column", default="prompt")
        p.add_argument("--response-column", default="response")
        p.add_argument("--context-column", default=None, help="joined into the prompt after a blank line")
        p.add_argument("--limit", type=int, default=None, help="use only the first N records")
        p.add_argument("--out", required=True, help="output directory (resumes if it holds the same job)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--top-k", type=int, default=64, help="cap K on the candidate set")
        p.add_argument("--top-p", type=float, default=0.8, help="nucleus mass p of A_p(s)")

    gen = sub.add_parser("generate-responses", help="sample teacher responses for a prompt source (SeqKD data)")
    _add_teacher_args(gen)
    add_source_args(gen)
    gen.add_argument("--num-responses", type=int, default=1, help="samples per prompt (the paper: 8)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--shard-size", type=int, default=256, help="responses per atomically written shard")
    gen.set_defaults(func=cmd_generate_responses)

    ann = sub.add_parser("annotate", help="run the teacher once over (prompt, response) data into an Arrow cache")
    _add_teacher_args(ann)
    add_source_args(ann)
    ann.add_argument("--reward", default="logprob", help="logprob, logit or inverse_soft_q")
    ann.add_argument("--gamma", type=float, default=0.99, help="discount for the inverse_soft_q reward")
    ann.add_argument("--max-prompt-len", type=int, default=512, help="longer prompts are skipped (or --strict)")
    ann.add_argument("--max-response-len", type=int, default=256, help="responses are cut to this many tokens")
    ann.add_argument("--logprob-dtype", default="float32", choices=["float32", "float16"])
    ann.add_argument("--shard-size", type=int, default=512, help="records per atomically written shard")
    ann.add_argument("--strict", action="store_true", help="error on a too-long prompt instead of skipping it")
    ann.set_defaults(func=cmd_annotate, batch_size=8)

    agents = sub.add_parser("agents", help="list the registered agents (built in and plug-ins)")
    agents.set_defaults(func=cmd_agents)

    train_help = "train one agent (flags: every TrainConfig field, e.g. --agent --teacher --student --data --steps)"
    train = sub.add_parser("train", help=train_help, add_help=False)
    train.add_argument("--resume", default=None, help="continue the run in this directory (or checkpoint)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint, a run directory or an exported model")
    evaluate.add_argument(
        "--checkpoint", required=True, help="a run directory, one of its checkpoints, best/, or a model"
    )
    evaluate.add_argument(
        "--teacher", default=None, help="teacher for references, NLL and coverage (default: the run's)"
    )
    evaluate.add_argument(
        "--data", default="bundled",
        help="prompts: 'bundled', 'dolly', a .jsonl/.json/.csv file or HF data set with a prompt column and an "
        "optional reference column (human references: eval/rougeL_reference)",
    )  # fmt: skip
    evaluate.add_argument("--split", default=None, help="split of --data (bundled: default heldout)")
    evaluate.add_argument("--prompt-column", default="prompt")
    evaluate.add_argument("--reference-column", default="reference", help="column of human reference answers")
    evaluate.add_argument("--context-column", default=None, help="joined into the prompt after a blank line")
    evaluate.add_argument("--prompts", type=int, default=64, help="evaluate the first N prompts")
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the paper: 5 seeds")
    evaluate.add_argument("--top-p", type=float, default=0.8, help="the paper: 0.8 (no top-k cap)")
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--greedy", action="store_true", help="only greedy decoding")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=cmd_eval)

    warm = sub.add_parser(
        "warm-start", help="train the shared starting student (full-vocabulary KD) and export it", add_help=False
    )
    warm.add_argument("--overwrite", action="store_true", help="replace a warm start made with other settings")
    warm.set_defaults(func=cmd_warm_start)

    comp = sub.add_parser("compare", help="train several agents on the same data, budget and seeds", add_help=False)
    comp.add_argument(
        "--agents",
        default="bc,sql,iql,iqlearn,cql,bd",
        help="comma-separated agent specs (name, name:key=value, or kd / sft / seqkd)",
    )
    comp.add_argument("--seeds", type=int, default=1, help="number of seeds (0 .. N-1)")
    comp.set_defaults(func=cmd_compare)

    board = sub.add_parser("tensorboard", help="serve TensorBoard for a run directory on 127.0.0.1")
    board.add_argument("logdir")
    board.add_argument("--port", type=int, default=6006)
    board.set_defaults(func=cmd_tensorboard)

    demo = sub.add_parser(
        "demo", help="the main job: a warm start that writes, then the paper's agents, tested on held-out prompts "
        "(43 min cold on 2 cores, 23 min once cached)",
        add_help=False,
    )  # fmt: skip
    _demo_flags(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def _demo_flags(parser: argparse.ArgumentParser) -> None:
    from tdrl.training.warmstart import RECIPE

    parser.add_argument("--agents", default=DEMO_AGENTS, help=f"comma-separated agent specs (default: {DEMO_AGENTS})")
    parser.add_argument("--seeds", type=int, default=DEMO_SEEDS, help="number of seeds (0 .. N-1)")
    parser.add_argument("--warm-start-steps", type=int, default=WARM_START_STEPS, help="steps of the shared warm start")
    parser.add_argument("--warm-start-lr", type=float, default=RECIPE["lr"], help="learning rate of the warm start")


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] in (["train"], ["compare"], ["demo"], ["warm-start"]) and any(a in ("-h", "--help") for a in argv):
        try:
            return _train_help(argv[0], argv)
        except TdrlError as exc:
            print(f"tdrl: error: {exc}", file=sys.stderr)
            return 2
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "compare", "demo", "warm-start"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        from tdrl.actions import validate_top_k, validate_top_p

        for p in _as_list(getattr(args, "top_p", None)):
            validate_top_p(p)
        for k in _as_list(getattr(args, "top_k", None)):
            validate_top_k(k)
        _quiet_libraries()
        return args.func(args)
    except KeyboardInterrupt as exc:
        default = "interrupted: every complete checkpoint is intact (resume with tdrl train --resume RUN)"
        print(f"tdrl: {str(exc) or default}",
              file=sys.stderr)  # fmt: skip
        return 130
    except Exception as exc:
        if debug or not _expected(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"tdrl: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _expected(exc: BaseException) -> bool:
    """Errors from bad input (ours, and the libraries' for unreadable files, bad values, missing GPUs)
    print one line; anything else is a bug and keeps its traceback."""
    import yaml

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = OSError  # noqa: N806
    import pickle

    return isinstance(
        exc,
        (
            TdrlError,
            ValueError,
            TypeError,
            OSError,
            yaml.YAMLError,
            SafetensorError,
            pickle.UnpicklingError,
            EOFError,
        ),  # fmt: skip
    ) or (isinstance(exc, RuntimeError) and ("torch" in type(exc).__module__ or "CUDA" in str(exc)))


def _train_help(command: str, argv: list[str]) -> int:
    """``tdrl train --help`` (and compare / warm-start / demo): every TrainConfig flag with its help; with
    ``--agent NAME`` (train) also that agent's own typed flags."""
    from tdrl.agents import get_agent
    from tdrl.training.args import train_parser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--agent")
    agent = pre.parse_known_args(argv)[0].agent if command == "train" else None
    parser = train_parser(get_agent(agent).Config if agent else None, prog=f"tdrl {command}")
    if command == "train":
        parser.add_argument("--resume", help="continue the run in this directory (or checkpoint)")
        if not agent:
            parser.epilog = "tdrl train --agent NAME --help also lists the agent's own settings (e.g. --expert-term)"
    elif command == "warm-start":
        parser.set_defaults(**warm_start_defaults())
        parser.add_argument("--overwrite", action="store_true", help="replace a warm start made with other settings")
    elif command == "demo":
        parser.set_defaults(**DEMO_DEFAULTS)
        _demo_flags(parser)
    else:
        parser.add_argument(
            "--agents", default="bc,sql,iql,iqlearn,cql,bd",
            help="comma-separated agent specs (name, name:key=value, kd, sft, seqkd)",
        )  # fmt: skip
        parser.add_argument("--seeds", type=int, default=1, help="number of seeds (0 .. N-1)")
    parser.print_help()
    return 0


def _quiet_libraries() -> None:
    """Keep transformers' per-load progress bars and advisory warnings out of the CLI's output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())
