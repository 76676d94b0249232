"""The ``tdrl`` command line. Errors tdrl raises on purpose print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tdrl.errors import ConfigError, TdrlError

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


def _source(args: argparse.Namespace, require_response: bool = False):
    from tdrl.data import load_source

    return load_source(
        args.source,
        split=args.split,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        context_column=args.context_column,
        require_response=require_response,
    )


def _subset(ds, limit: int | None):
    return ds if limit is None or limit >= len(ds) else ds.select(range(limit))


def cmd_generate_responses(args: argparse.Namespace) -> int:
    from tdrl.data import generate_responses
    from tdrl.teachers import load_teacher

    source = _subset(_source(args), args.limit)
    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    out = generate_responses(
        teacher, source, args.out, num_responses=args.num_responses, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size,
        seed=args.seed, shard_size=args.shard_size, progress=True,
    )  # fmt: skip
    print(f"wrote {len(source) * args.num_responses} teacher responses to {out}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from tdrl.data import ANNOTATION_META, annotate
    from tdrl.integrity import read_json
    from tdrl.teachers import load_teacher

    source = _subset(_source(args, require_response=True), args.limit)
    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    out = annotate(
        teacher, source, args.out, top_k=args.top_k, top_p=args.top_p, reward=args.reward, gamma=args.gamma,
        max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
        logprob_dtype=args.logprob_dtype, batch_size=args.batch_size, shard_size=args.shard_size,
        strict=args.strict, progress=True,
    )  # fmt: skip
    meta = read_json(out / ANNOTATION_META, "annotation metadata")
    stats = meta["statistics"]
    print(
        f"annotated {meta['records']} records ({stats['tokens']} response tokens; skipped: "
        f"{', '.join(f'{n} {k}' for k, n in meta['skipped'].items() if n) or 'none'}) "
        f"into {out}\nmean |A_p(s)| {stats['support_size']:.2f}, mean teacher mass in A_p(s) "
        f"{stats['support_mass']:.3f}, data tokens inside A_p(s) {stats['action_in_cand']:.3f}, "
        f"{meta['bytes_per_token']:.0f} bytes/token on disk"
    )
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    from tdrl.agents import get_agent, list_agents

    names = list_agents()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {get_agent(name).description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tdrl.config import parse_train_args
    from tdrl.trainer import Trainer

    if args.resume:
        extra = argparse.ArgumentParser(prog="tdrl train --resume")
        extra.add_argument("--steps", type=int, default=None, help="extend the run to this many steps")
        steps = extra.parse_args(args.rest).steps
        trainer = Trainer.resume(args.resume, steps=steps)
    else:
        config, rest = parse_train_args(args.rest)
        if rest:
            raise ConfigError(f"unknown argument(s): {' '.join(rest)} (see `tdrl train --help`)")
        trainer = Trainer(config)
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    last, best = (summary.get("last") or {}).get("metrics", {}), (summary.get("best") or {}).get("metrics", {})
    print(f"{summary['agent']} seed {summary['seed']}: {summary['steps']} steps in {summary['wall_time_s']:.0f} s")
    for key in sorted(k for k in last if not k.endswith("_std")):
        print(f"  {key:<20} last {last[key]:8.3f}   best {best.get(key, float('nan')):8.3f}")
    print(f"  run directory: {summary['config']['out']}  (tdrl tensorboard {summary['config']['out']})")


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tdrl.errors import CheckpointNotFoundError
    from tdrl.evaluation import EvalConfig, evaluate, reference_records
    from tdrl.integrity import read_json
    from tdrl.students import load_student
    from tdrl.teachers import load_teacher
    from tdrl.trainer import RUN_FILE, find_checkpoint

    path = Path(args.checkpoint)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist: pass a run, checkpoint or best/ directory")
    weights = ("model.safetensors", "model.safetensors.index.json")
    is_model = (path / "config.json").is_file() and any((path / w).is_file() for w in weights)
    model_dir, run = (path, path / RUN_FILE) if is_model else (None, None)
    if model_dir is None:
        checkpoint = find_checkpoint(path, verify=True)
        model_dir, run = checkpoint / "student", checkpoint / RUN_FILE
    info = read_json(run, "run record") if run is not None and run.is_file() else {}
    teacher_name = args.teacher or info.get("teacher") or "bundled"  # the run's own teacher unless told otherwise
    teacher = load_teacher(teacher_name, dtype=info.get("teacher_dtype", "float32"), device=args.device)
    student = load_student(str(model_dir)).to(args.device)
    split = args.split or ("test" if args.data == "bundled" else None)
    records = reference_records(
        teacher, args.data, split=split, n=args.prompts, max_new_tokens=args.max_new_tokens,
        prompt_column=args.prompt_column, reference_column=args.reference_column, context_column=args.context_column,
    )  # fmt: skip
    config = EvalConfig(
        max_new_tokens=args.max_new_tokens, seeds=args.seeds, top_p=args.top_p, temperature=args.temperature,
        greedy=args.greedy, also_greedy=not args.greedy,
    )  # fmt: skip
    temperature = info.get("decode_temperature", 1.0)
    metrics, samples = evaluate(
        student.model, student.tokenizer, teacher, records, config, decode_temperature=temperature
    )
    where = f"{args.data} {split}" if split else args.data
    print(f"{model_dir} on {len(records)} {where} prompts, teacher {teacher_name}, seeds {config.seeds}:")
    for key in sorted(k for k in metrics if not k.endswith("_std")):
        print(f"  {key:<22} {metrics[key]:8.3f} ± {metrics[key + '_std']:.3f}")
    if "eval/rougeL_reference" not in metrics:
        print(
            f"  (no human references in {args.data}: add a '{args.reference_column}' column for eval/rougeL_reference)"
        )
    for sample in samples[:2]:
        print(f"\n  prompt:  {sample['prompt']}\n  student: {sample['student']}\n  teacher: {sample['teacher']}")
    return 0


#: ``tdrl warm-start``'s presets (64 steps of full-vocabulary KD at lr 1e-4: validation Rouge-L about 28
#: for the bundled teacher's ``layers:0,10,20,29`` cut, which writes no words before).
WARM_START_DEFAULTS = {"steps": 64, "lr": 1e-4, "out": "runs/warm-start"}


def cmd_warm_start(args: argparse.Namespace) -> int:
    from tdrl.config import parse_train_args
    from tdrl.warmstart import warm_start

    config, rest = parse_train_args(args.rest, defaults=WARM_START_DEFAULTS)
    if rest:
        raise ConfigError(f"unknown argument(s): {' '.join(rest)} (see `tdrl warm-start --help`)")
    out, record = warm_start(config, config.out, overwrite=args.overwrite)
    validation = record["validation"]
    rouge = f", validation Rouge-L {validation['eval/rougeL']:.2f}" if "eval/rougeL" in validation else ""
    print(f"warm start in {out} ({record['steps']} steps of full-vocabulary KD, {record['train_time_s']:.0f} s of "
          f"training{rouge}; fingerprint {record['fingerprint']}); train from it with --student {out}")  # fmt: skip
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tdrl.config import parse_train_args

    config, rest = parse_train_args(args.rest)
    if rest:
        raise ConfigError(f"unknown argument(s): {' '.join(rest)} (see `tdrl compare --help`)")
    return _compare(config, args.agents, args.seeds)


def _compare(config, agents: str, seeds: int, start: str = "start") -> int:
    from pathlib import Path

    from tdrl.compare import compare, results_table, split_agent_specs

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(config.out)
    summaries = compare(split_agent_specs(agents), list(range(seeds)), config, out, start=start)
    print(results_table(summaries))
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'eval_curves.png'}")
    print(f"TensorBoard: tdrl tensorboard {out / 'runs'}   (then open http://127.0.0.1:6006/)")
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    import subprocess

    url = f"http://127.0.0.1:{args.port}/"
    print(f"TensorBoard for {args.logdir}: {url}  (Ctrl-C stops it)", flush=True)
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        args.logdir,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    return subprocess.call(command)


#: The demo: a shared warm start (cached in runs/demo/warm-start), then the paper's set (sft, kd, bd) and
#: the offline RL agents (sql, cql, iql) from it, 3 seeds each, scored on bundled test prompts.
DEMO_DEFAULTS = {
    "teacher": "bundled", "student": "layers:0,10,20,29", "data": "bundled", "train_prompts": 192,
    "response_tokens": 40, "steps": 16, "lr": 2e-5, "warmup_steps": 2, "eval_every": 8, "eval_prompts": 8,
    "eval_max_new_tokens": 24, "test_prompts": 16, "checkpoint_every": 16, "log_every": 4, "out": "runs/demo",
    "overwrite": True,  # a second demo replaces the first one's runs (the warm start is reused)
}  # fmt: skip
DEMO_AGENTS = "sft,kd,bd,sql,cql,iql"


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses
    import time
    from pathlib import Path

    from tdrl.config import parse_train_args
    from tdrl.warmstart import warm_start

    start = time.perf_counter()
    config, rest = parse_train_args(args.rest, defaults=DEMO_DEFAULTS)
    if rest:
        raise ConfigError(f"unknown argument(s): {' '.join(rest)} (see `tdrl demo --help`)")
    steps = args.warm_start_steps
    warm = dataclasses.replace(config, steps=steps, lr=args.warm_start_lr, warmup_steps=max(1, steps // 10), seed=0)
    print(f"warm start: {steps} steps of full-vocabulary KD of {config.student} (reused when cached) ...", flush=True)
    path, record = warm_start(warm, Path(config.out) / "warm-start")
    print(f"warm start ready in {path} ({record['train_time_s']:.0f} s of training)", flush=True)
    status = _compare(dataclasses.replace(config, student=str(path)), args.agents or DEMO_AGENTS, args.seeds,
                      start="warm start")  # fmt: skip
    print(f"demo wall time: {time.perf_counter() - start:.0f} s")
    return status


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
        p.add_argument("--split", default=None, help="split to read (bundled: train, validation or test)")
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
    evaluate.add_argument("--split", default=None, help="split of --data (bundled: default test)")
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
        "demo", help="the main job: a warm start, then six agents x 3 seeds on the bundled teacher (~15 min)",
        add_help=False,
    )  # fmt: skip
    demo.add_argument("--agents", default=None, help=f"default: {DEMO_AGENTS}")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    demo.add_argument("--warm-start-steps", type=int, default=64, help="steps of the shared warm start")
    demo.add_argument("--warm-start-lr", type=float, default=1e-4, help="learning rate of the shared warm start")
    demo.set_defaults(func=cmd_demo)
    return parser


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] in (["train"], ["compare"], ["demo"], ["warm-start"]) and any(a in ("-h", "--help") for a in argv):
        return _train_help(argv[0])
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


def _train_help(command: str) -> int:
    from transformers import HfArgumentParser

    from tdrl.config import TrainConfig

    parser = HfArgumentParser(TrainConfig, prog=f"tdrl {command}")
    parser.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    if command == "train":
        parser.add_argument("--resume", help="continue the run in this directory (or checkpoint)")
    elif command == "warm-start":
        parser.set_defaults(**WARM_START_DEFAULTS)
        parser.add_argument("--overwrite", action="store_true", help="replace a warm start made with other settings")
    elif command == "demo":
        parser.set_defaults(**DEMO_DEFAULTS)
        parser.add_argument("--agents", help=f"comma-separated agent specs (default: {DEMO_AGENTS})")
        parser.add_argument("--seeds", type=int, help="number of seeds (default 3)")
        parser.add_argument("--warm-start-steps", type=int, help="steps of the shared warm start (default 64)")
        parser.add_argument("--warm-start-lr", type=float, help="learning rate of the shared warm start (1e-4)")
    else:
        parser.add_argument("--agents", help="comma-separated agent specs (name, name:key=value, kd, sft, seqkd)")
        parser.add_argument("--seeds", type=int, help="number of seeds (0 .. N-1)")
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
