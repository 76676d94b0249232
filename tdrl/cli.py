"""The ``tdrl`` command line: the parser and the error policy (errors from bad input print one line and
exit with status 2; ``--debug`` shows the traceback). The subcommands live in :mod:`tdrl.commands`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tdrl.commands import (
    EVAL_FLAGS,
    SAMPLE_PROMPTS,
    WARM_START_STEPS,
    cmd_agents,
    cmd_annotate,
    cmd_eval,
    cmd_generate_responses,
    cmd_teacher_info,
    cmd_tensorboard,
    cmd_train,
    cmd_warm_start,
    warm_start_defaults,
)
from tdrl.comparing import COMPARE_AGENTS, DEMO_AGENTS, DEMO_DEFAULTS, DEMO_SEEDS, cmd_compare, cmd_demo
from tdrl.errors import TdrlError

TRAINING_COMMANDS = ("train", "compare", "demo", "warm-start")


def _command_presets(command: str) -> dict:
    """The presets a training command lays under the config file and flags."""
    return {"warm-start": warm_start_defaults, "demo": lambda: dict(DEMO_DEFAULTS)}.get(command, dict)()


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line, each subparser built once: ``--help`` of every subcommand comes from the
    parser that parses it. ``tdrl train``'s typed agent flags are those of the agent ``argv`` names
    (``--agent``, its ``--config`` file's agent, else the default agent)."""
    from tdrl.agents import get_agent
    from tdrl.errors import SEED_RANGE, field_limits
    from tdrl.evaluation import EvalConfig
    from tdrl.training.args import add_config_arguments, agent_from_argv, one_line_errors
    from tdrl.training.config import TrainConfig

    argv = list(argv)
    parser = argparse.ArgumentParser(
        prog="tdrl", description="LM distillation as offline RL on the top-p token MDP.", allow_abbrev=False
    )
    named = argv[0] if argv and not argv[0].startswith("-") else None
    parser.error = one_line_errors(parser, f"tdrl {named}" if named else "tdrl")  # e.g. an unknown flag
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *parents: argparse.ArgumentParser, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=list(parents), allow_abbrev=False, **kw)
        p.error = one_line_errors(p)
        return p

    teacher_args = argparse.ArgumentParser(add_help=False)
    teacher_args.add_argument(
        "--teacher",
        default="bundled",
        help="'bundled' (SmolLM2-135M-Instruct, default), 'tiny', a local directory or a hub id",
    )
    teacher_args.add_argument(
        "--teacher-dtype",
        "--dtype",
        dest="dtype",
        default="float32",
        help="teacher dtype: float32, bfloat16 or float16",
    )
    teacher_args.add_argument(
        "--device",
        default="cpu",
        help="torch device for the teacher, e.g. cpu or cuda (under accelerate launch: cuda is each process's GPU)",
    )
    teacher_args.add_argument(
        "--teacher-device-map",
        dest="device_map",
        default=None,
        help="spread a big teacher over devices (accelerate's big-model loading; --device is then not used): auto, "
        "balanced, sequential, a device such as cuda:1, or a JSON object of module names to devices",
    )
    teacher_args.add_argument(
        "--trust-remote-code", action="store_true", help="allow a hub model's own code to run (off by default)"
    )

    info = command("teacher-info", "vocabulary, size and top-p sparsity of a teacher", teacher_args)
    info.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="nucleus masses p")
    info.add_argument("--top-k", type=int, nargs="+", default=[64, 256], help="candidate caps k")
    info.add_argument("--num-prompts", type=int, default=8, help=f"sample prompts to use (max {len(SAMPLE_PROMPTS)})")
    info.add_argument("--max-new-tokens", type=int, default=48, help="teacher response length per prompt")
    info.add_argument("--seed", type=int, default=0)
    info.set_defaults(func=cmd_teacher_info)

    source_args = argparse.ArgumentParser(add_help=False)
    source_args.add_argument(
        "--source",
        default="bundled",
        help="'bundled', 'dolly', a .jsonl/.json/.csv file, a generate-responses directory, "
        "a save_to_disk directory or a hub data set id",
    )
    source_args.add_argument(
        "--split",
        default=None,
        help="split to read (bundled: train, validation, test or heldout; default: the template splits)",
    )
    source_args.add_argument("--prompt-column", default="prompt")
    source_args.add_argument("--response-column", default="response")
    source_args.add_argument("--context-column", default=None, help="joined into the prompt after a blank line")
    source_args.add_argument("--limit", type=int, default=None, help="use only the first N records")
    source_args.add_argument("--out", required=True, help="output directory (resumes if it holds the same job)")
    source_args.add_argument("--top-k", type=int, default=64, help="cap K on the candidate set")
    source_args.add_argument("--top-p", type=float, default=0.8, help="nucleus mass p of A_p(s)")

    gen = command(
        "generate-responses", "sample teacher responses for a prompt source (SeqKD data)", teacher_args, source_args
    )
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--num-responses", type=int, default=1, help="samples per prompt (the paper: 8)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--shard-size", type=int, default=256, help="responses per atomically written shard")
    gen.set_defaults(func=cmd_generate_responses)

    ann = command(
        "annotate", "run the teacher once over (prompt, response) data into an Arrow cache", teacher_args, source_args
    )
    ann.add_argument("--batch-size", type=int, default=8)
    ann.add_argument("--reward", default="logprob", help="logprob, logit or inverse_soft_q")
    ann.add_argument("--gamma", type=float, default=0.99, help="discount for the inverse_soft_q reward")
    ann.add_argument("--max-prompt-len", type=int, default=512, help="longer prompts are skipped (or --strict)")
    ann.add_argument("--max-response-len", type=int, default=256, help="responses are cut to this many tokens")
    ann.add_argument(
        "--keep-top-p",
        type=float,
        default=None,
        help="keep each state's candidates up to this teacher mass (>= --top-p; default max(0.9, --top-p)): the "
        "largest p an agent can re-cut the cache at; 1.0 keeps the whole top-K",
    )
    ann.add_argument(
        "--logprob-dtype", default="float16", choices=["float16", "float32"], help="stored candidate log-probs"
    )
    ann.add_argument("--shard-size", type=int, default=512, help="records per atomically written shard")
    ann.add_argument("--strict", action="store_true", help="error on a too-long prompt instead of skipping it")
    ann.set_defaults(func=cmd_annotate)

    command("agents", "list the registered agents (built in and plug-ins)").set_defaults(func=cmd_agents)

    agent = agent_from_argv(argv[1:]) if argv[:1] == ["train"] else TrainConfig.agent
    train = command(
        "train",
        "train one agent (every TrainConfig setting is a flag; the chosen --agent's own settings too)",
        epilog="`tdrl train --agent NAME --help` lists that agent's own settings (default agent: bd)",
    )
    train.add_argument(
        "--resume",
        default=None,
        help="continue the run in this directory (or checkpoint); only --steps may change; with --overwrite, "
        "a checkpoint older than the run's newest: delete the run's checkpoints and best/ newer than it",
    )
    chosen = get_agent(agent)
    add_config_arguments(train, agent_config=chosen.Config, agent_presets=chosen.trainer_defaults)
    train.set_defaults(func=cmd_train)

    evaluate = command("eval", "evaluate a checkpoint, a run directory or an exported model")
    evaluate.add_argument(
        "--checkpoint", required=True, help="a run directory, one of its checkpoints, best/, or a model"
    )
    evaluate.add_argument(
        "--teacher", default=None, help="teacher for references, NLL and coverage (default: the run's)"
    )
    evaluate.add_argument(
        "--data",
        default="bundled",
        help="prompts: 'bundled', 'dolly', a .jsonl/.json/.csv file or HF data set with a prompt column and an "
        "optional reference column (human references: eval/rougeL_reference)",
    )
    evaluate.add_argument("--split", default=None, help="split of --data (bundled: default heldout)")
    evaluate.add_argument("--prompt-column", default="prompt")
    evaluate.add_argument("--reference-column", default="reference", help="column of human reference answers")
    evaluate.add_argument("--context-column", default=None, help="joined into the prompt after a blank line")
    evaluate.add_argument("--prompts", type=int, default=64, help="evaluate the first N prompts")
    ranges = {flag: f" (range: {field_limits(EvalConfig, name)[1]})" for flag, name in EVAL_FLAGS.items()}
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=64, help="response length limit" + ranges["--max-new-tokens"]
    )
    evaluate.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help=f"sampling seeds (the paper: 5); at least one, none twice (range: each in {SEED_RANGE})",
    )
    evaluate.add_argument("--top-p", type=float, default=0.8, help="the paper: 0.8 (no top-k cap)" + ranges["--top-p"])
    evaluate.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature" + ranges["--temperature"]
    )
    evaluate.add_argument("--greedy", action="store_true", help="only greedy decoding")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument(
        "--teacher-device-map", dest="device_map", default=None, help="as for tdrl annotate (default: no map)"
    )
    evaluate.set_defaults(func=cmd_eval)

    warm = command("warm-start", "train the shared starting student (full-vocabulary KD) and export it")
    # the warm start fixes its agent (KD), runs no test, collects no episodes and adds no J_PT: no such flags
    groups = ("optim", "data", "eval", "lora")
    add_config_arguments(warm, presets=_command_presets("warm-start"), agent=False, groups=groups)
    warm.set_defaults(func=cmd_warm_start)

    specs = "comma-separated agent specs (name, name:key=value, or kd / sft / seqkd)"
    comp = command("compare", "train several agents on the same data, budget and seeds")
    comp.add_argument("--agents", default=COMPARE_AGENTS, help=f"{specs} (default: {COMPARE_AGENTS})")
    comp.add_argument("--seeds", type=int, default=1, help="number of seeds (0 .. N-1) (default: 1)")
    add_config_arguments(comp, agent=False)  # the agents and their settings come from --agents specs
    comp.set_defaults(func=cmd_compare)

    board = command("tensorboard", "serve TensorBoard for a run directory on 127.0.0.1")
    board.add_argument("logdir")
    board.add_argument("--port", type=int, default=6006)
    board.set_defaults(func=cmd_tensorboard)

    from tdrl.training.warmstart import RECIPE

    demo = command(
        "demo",
        "the main job: a warm start that writes, then the paper's agents, tested on held-out prompts "
        "(43 min cold on 2 cores, 23 min once cached)",
    )
    demo.add_argument("--agents", default=DEMO_AGENTS, help=f"{specs} (default: {DEMO_AGENTS})")
    demo.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"number of seeds (default: {DEMO_SEEDS})")
    demo.add_argument(
        "--warm-start-steps",
        type=int,
        default=WARM_START_STEPS,
        help=f"steps of the shared warm start (default: {WARM_START_STEPS})",
    )
    demo.add_argument(
        "--warm-start-lr",
        type=float,
        default=RECIPE["lr"],
        help=f"warm start's learning rate (default: {RECIPE['lr']})",
    )
    add_config_arguments(demo, presets=_command_presets("demo"), agent=False)
    demo.set_defaults(func=cmd_demo)
    return parser


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser(argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (or argparse's own exit)
            return exc.code if isinstance(exc.code, int) else 0
        if args.command in TRAINING_COMMANDS:
            args.presets = _command_presets(args.command)
        from tdrl.actions import validate_top_k, validate_top_p

        if args.command not in TRAINING_COMMANDS:
            for p in _as_list(getattr(args, "top_p", None)):
                validate_top_p(p)
            for k in _as_list(getattr(args, "top_k", None)):
                validate_top_k(k)
        _quiet_libraries()
        return args.func(args)
    except KeyboardInterrupt as exc:
        print(f"tdrl: {_interrupted(argv[0] if argv else '', str(exc))}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not _expected(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"tdrl: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


#: What to do after Ctrl-C, per command that resumes by being run again.
RERUN = {
    "annotate": "every complete shard is kept: run the same command again to resume",
    "generate-responses": "every complete shard is kept: run the same command again to resume",
    "warm-start": "its last checkpoint is kept: run the same command again to resume the warm start",
    "demo": "the warm start keeps its last checkpoint: the same command again resumes it (the runs start over)",
    "compare": "each run's last checkpoint is kept: resume a run with tdrl train --resume RUN",
}


def _interrupted(command: str, message: str) -> str:
    """The advice after Ctrl-C: the trainer's own (train: resume with --resume), else the command's."""
    if command in RERUN:
        return f"interrupted: {RERUN[command]}"
    return message or "interrupted: every complete checkpoint is intact (resume with tdrl train --resume RUN)"


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
        ),
    ) or (isinstance(exc, RuntimeError) and ("torch" in type(exc).__module__ or "CUDA" in str(exc)))


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
