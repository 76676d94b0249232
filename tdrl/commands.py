"""The ``tdrl`` subcommands: each resolves names (teachers, students, data, agents) into objects and
calls the library; :mod:`tdrl.cli` parses the command line and turns errors into one line."""

from __future__ import annotations

import argparse
import sys

from tdrl.errors import ConfigError

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


#: ``tdrl warm-start``'s presets: the measured recipe (:data:`tdrl.training.warmstart.RECIPE`, RESULTS.md
#: "The warm start"), 256 steps: on held-out prompts its mode lies in A_p(s) at 83% of its own states, its
#: mass outside A_p(s) is 0.42, and its samples read as English (the raw cut: 46%, 0.72, no words).
WARM_START_STEPS = 256


def warm_start_defaults() -> dict:
    from tdrl.training.warmstart import RECIPE

    return {**RECIPE, "steps": WARM_START_STEPS, "out": "runs/warm-start", "eval_every": 0}


def _print_summary(summary) -> None:
    last = summary.last.metrics if summary.last else {}
    best = summary.best.metrics if summary.best else {}
    print(f"{summary.agent} seed {summary.seed}: {summary.steps} steps in {summary.wall_time_s:.0f} s")
    for key in sorted(k for k in last if not k.endswith("_std")):
        print(f"  {key:<20} last {last[key]:8.3f}   best {best.get(key, float('nan')):8.3f}")
    if summary.test is not None and summary.test.best_unavailable:
        print(f"  not tested: {summary.test.best_unavailable}")
    print(f"  run directory: {summary.out}  (tdrl tensorboard {summary.out})")


def _teacher(args: argparse.Namespace):
    """The teacher of the flags (``--device cuda``: this process's GPU under a multi-process launch)."""
    from tdrl.models import load_teacher
    from tdrl.training.config import resolve_device

    kwargs = dict(dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    return load_teacher(args.teacher, device=resolve_device(args.device), **kwargs)


def cmd_teacher_info(args: argparse.Namespace) -> int:
    from tdrl.models import sparsity_statistics

    teacher = _teacher(args)
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
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1 (or left out: every record), got {limit}")
    return ds if limit is None or limit >= len(ds) else ds.select(range(limit))


#: The flags of generate-responses and annotate passed on as the writers' keywords of the same names.
GENERATE_FLAGS = ("num_responses", "max_new_tokens", "temperature", "top_k", "top_p", "batch_size", "seed")
GENERATE_FLAGS += ("shard_size",)
ANNOTATE_FLAGS = ("top_k", "top_p", "reward", "gamma", "max_prompt_len", "max_response_len", "keep_top_p")
ANNOTATE_FLAGS += ("logprob_dtype", "batch_size", "shard_size", "strict")


def cmd_generate_responses(args: argparse.Namespace) -> int:
    from tdrl.data import Ranks, generate_responses

    settings = {name: getattr(args, name) for name in GENERATE_FLAGS}
    with Ranks.from_environment() as ranks:  # N processes under accelerate launch / torchrun, each its shards
        source = _subset(_source(args), args.limit)
        out = generate_responses(_teacher(args), source, args.out, **settings, progress=ranks.is_main, ranks=ranks)
    if ranks.is_main:
        print(f"wrote {len(source) * args.num_responses} teacher responses to {out}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from tdrl.actions import validate_top_k, validate_top_p
    from tdrl.data import ANNOTATION_META, Ranks, annotate
    from tdrl.data.layout import check_keep_top_p
    from tdrl.integrity import read_json

    top_p = validate_top_p(args.top_p)  # before the teacher loads
    if args.keep_top_p is not None:
        check_keep_top_p(args.keep_top_p, top_p)
    validate_top_k(args.top_k)
    settings = {name: getattr(args, name) for name in ANNOTATE_FLAGS}
    with Ranks.from_environment() as ranks:  # N processes under accelerate launch / torchrun, each its shards
        source = _subset(_source(args, require_response=True), args.limit)
        out = annotate(_teacher(args), source, args.out, **settings, progress=ranks.is_main, ranks=ranks)
    if not ranks.is_main:
        return 0
    meta = read_json(out / ANNOTATION_META, "annotation metadata")
    stats = meta["statistics"]
    print(
        f"annotated {meta['records']} records ({stats['tokens']} response tokens; skipped: "
        f"{', '.join(f'{n} {k}' for k, n in meta['skipped'].items() if n) or 'none'}) "
        f"into {out}\nmean |A_p(s)| {stats['support_size']:.2f}, mean teacher mass in A_p(s) "
        f"{stats['support_mass']:.3f}, data tokens inside A_p(s) {stats['data_in_set']:.3f}, "
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


def _config(args: argparse.Namespace, *, agent: bool = True):
    """The command's TrainConfig; a command that chooses its agents itself (``agent=False``: compare and
    demo take them from --agents specs, warm-start is KD) refuses an agent or agent settings in the file."""
    from tdrl.training.args import config_from_args
    from tdrl.training.config import TrainConfig

    config = config_from_args(args, args.presets)
    if not agent and (config.agent != TrainConfig.agent or config.agent_config is not None):
        how = "KD" if args.command == "warm-start" else "--agents specs, e.g. --agents 'bd:alpha=0.2'"
        raise ConfigError(
            f"tdrl {args.command} chooses its agents itself ({how}): drop agent and agent settings from --config"
        )
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from tdrl.training import build_trainer, resume_trainer
    from tdrl.training.config import config_leaves

    if args.resume:
        leaves = {f for *_, f in config_leaves()} | {"agent_args"}
        given = sorted(k for k in vars(args) if k.startswith("agent.") or k in leaves)
        if args.config or set(given) - {"steps", "overwrite"}:
            changed = ", ".join(["--config"] * bool(args.config) + [f"--{k.replace('_', '-')}" for k in given])
            raise ConfigError(
                f"--resume continues a run with its own settings; only --steps may change (given: {changed})"
            )
        overwrite = bool(getattr(args, "overwrite", False))  # with --resume: delete what is newer than its checkpoint
        trainer = resume_trainer(args.resume, steps=getattr(args, "steps", None), overwrite=overwrite)
    else:
        trainer = build_trainer(_config(args))
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        _print_summary(summary)
    return 0


#: ``tdrl eval``'s decoding flags -> the EvalConfig field whose declared range each must lie in.
EVAL_FLAGS = {"--max-new-tokens": "max_new_tokens", "--top-p": "top_p", "--temperature": "temperature"}


def check_eval_flags(args: argparse.Namespace) -> None:
    """``tdrl eval``'s decoding flags, before anything loads: each in the range its EvalConfig field
    declares, and ``--seeds`` by the rule of ``--eval-seeds`` (at least one, each in [0, 2**31), none
    twice); errors name the flag as typed."""
    from tdrl.errors import check_seeds, field_limits
    from tdrl.evaluation import EvalConfig

    for flag, name in EVAL_FLAGS.items():
        _, limits, _, why = field_limits(EvalConfig, name)
        limits.check(getattr(args, name), flag, why.replace("greedy=True", "--greedy"))
    check_seeds("--seeds", args.seeds)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tdrl.data import check_same_vocabulary
    from tdrl.errors import CheckpointNotFoundError
    from tdrl.evaluation import EvalConfig, evaluate, reference_records
    from tdrl.integrity import read_json
    from tdrl.models import load_student, load_teacher
    from tdrl.training.checkpoints import find_checkpoint
    from tdrl.training.config import resolve_device
    from tdrl.training.state import RUN_FILE, RunInfo
    from tdrl.training.warmstart import WARM_START_FILE

    check_eval_flags(args)
    path = Path(args.checkpoint)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist: pass a run, checkpoint or best/ directory")
    weights = ("model.safetensors", "model.safetensors.index.json")
    from tdrl.training.checkpoints import COMPLETE

    is_checkpoint = (path / COMPLETE).is_file()  # its config.json is the run's, its student/ the model
    is_model = not is_checkpoint and (path / "config.json").is_file() and any((path / w).is_file() for w in weights)
    is_model = is_model or (not is_checkpoint and (path / "adapter_config.json").is_file())  # a LoRA adapter export
    model_dir, run = (path, path / RUN_FILE) if is_model else (None, None)
    if model_dir is None:
        checkpoint = find_checkpoint(path, verify=True)
        model_dir, run = checkpoint / "student", checkpoint / RUN_FILE
    info = RunInfo.from_dict(read_json(run, "run record")) if run is not None and run.is_file() else None
    teacher_name, dtype = (info.teacher, info.teacher_dtype) if info else (None, "float32")
    warm = model_dir / WARM_START_FILE
    if info is None and warm.is_file():  # a warm start: its record names the teacher it was distilled from
        settings = read_json(warm, "warm start record").get("settings", {})
        teacher_name, dtype = settings.get("teacher"), settings.get("teacher_dtype", "float32")
    teacher_name = args.teacher or teacher_name  # the run's own teacher unless told otherwise
    if teacher_name is None:
        raise ConfigError(
            f"{model_dir} has no {RUN_FILE} (it is not a tdrl export): pass --teacher, the teacher it was distilled "
            "from (references, NLL and coverage are the teacher's)"
        )
    device = resolve_device(args.device)
    teacher = load_teacher(teacher_name, dtype=dtype, device=device, device_map=args.device_map)
    student = load_student(str(model_dir), teacher).to(device)  # the teacher: an adapter on a layer cut's base
    check_same_vocabulary(teacher.tokenizer, student.tokenizer)
    limits = [n for n in (teacher.max_length, getattr(student.model.config, "max_position_embeddings", None)) if n]
    if limits and args.max_new_tokens >= min(limits):
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens} does not fit the models' context of {min(limits)} tokens"
        )
    split = args.split or ("heldout" if args.data == "bundled" else None)
    records = reference_records(
        teacher,
        args.data,
        split=split,
        n=args.prompts,
        max_new_tokens=args.max_new_tokens,
        prompt_column=args.prompt_column,
        reference_column=args.reference_column,
        context_column=args.context_column,
    )
    config = EvalConfig(
        max_new_tokens=args.max_new_tokens,
        seeds=args.seeds,
        top_p=args.top_p,
        temperature=args.temperature,
        greedy=args.greedy,
        also_greedy=not args.greedy,
    )
    temperature = info.decode_temperature if info else 1.0
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


def cmd_warm_start(args: argparse.Namespace) -> int:
    from tdrl.training.warmstart import warm_start

    config = _config(args, agent=False)
    out, record = warm_start(config, config.out, overwrite=config.overwrite, eval_every=config.eval.every)
    validation = record["validation"]
    rouge = f", validation Rouge-L {validation['eval/rougeL']:.2f}" if "eval/rougeL" in validation else ""
    print(
        f"warm start in {out} ({record['steps']} steps of full-vocabulary KD, {record['train_time_s']:.0f} s of "
        f"training{rouge}; fingerprint {record['fingerprint']}); train from it with --student {out}"
    )
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
