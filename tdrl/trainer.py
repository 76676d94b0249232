"""The agent-agnostic training loop: batches -> agent.loss -> AdamW -> logs, eval, checkpoints.

The trainer owns optimisation (AdamW, warm-up + cosine/linear schedule, clipping, accumulation,
autocast), data order (a seeded, resumable :class:`~tdrl.data.BucketBatchSampler`), evaluation with
model selection on validation Rouge-L (the paper's), TensorBoard logging, and checkpoints:

* every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM, a checkpoint is written to a
  temporary directory and renamed into ``out/checkpoints/step-NNNNNNN`` once complete (the last K are
  kept): the full agent state (student, target networks, heads) in safetensors, optimiser and
  scheduler state, the sampler position, the torch RNG state, the config and the trainer state;
  the student is also exported as an ordinary HF model (``student/``);
* ``out/best/`` holds the student with the best validation Rouge-L so far;
* :meth:`Trainer.resume` continues from the newest complete checkpoint so that an interrupted and
  resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from tdrl.agents import get_agent, make_agent
from tdrl.agents.base import TRAINER_METRIC_GROUPS
from tdrl.config import TrainConfig, parse_agent_args
from tdrl.data import (
    BucketBatchSampler,
    DistillDataset,
    annotate,
    check_same_vocabulary,
    collate,
    generate_responses,
    load_source,
    write_json_atomic,
)
from tdrl.errors import CheckpointNotFoundError, ConfigError, DataError
from tdrl.evaluation import EvalConfig, evaluate, reference_records
from tdrl.integrity import DirectoryLock, read_json, verify_manifest, write_manifest
from tdrl.records import record_tensors
from tdrl.students import VOCAB_CHUNK, gather_logits, load_student, vocab_logsumexp
from tdrl.teachers import Teacher, load_teacher, tdrl_cache_dir
from tdrl.tracking import Tracker, samples_markdown

__all__ = ["Trainer", "prepare_bundled_data", "find_checkpoint", "run_directory", "set_seed", "RUN_FILE"]

log = logging.getLogger(__name__)

COMPLETE = "tdrl-checkpoint.json"
#: Beside every exported student (``best/``, a warm start): what it came from, so ``tdrl eval`` can
#: use the run's own teacher and the agent's decoding temperature.
RUN_FILE = "tdrl-run.json"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data
def _data_root(teacher: Teacher, config: TrainConfig) -> Path:
    key = json.dumps([teacher.weights_fingerprint(), config.train_prompts, config.response_tokens, config.top_k,
                      config.top_p])  # fmt: skip
    return tdrl_cache_dir() / "data" / f"bundled-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_bundled_data(teacher: Teacher, config: TrainConfig, progress: bool = True) -> Path:
    """Teacher responses for the bundled training prompts, annotated: built on first use under
    ``$TDRL_CACHE/data`` (both steps are fingerprinted and resumable), reused afterwards."""
    root = _data_root(teacher, config)
    prompts = load_source("bundled", split="train")
    if config.train_prompts:
        prompts = prompts.select(range(min(config.train_prompts, len(prompts))))
    responses = generate_responses(
        teacher, prompts, root / "responses", max_new_tokens=config.response_tokens, top_k=config.top_k,
        top_p=config.top_p, seed=0, batch_size=16, shard_size=128, progress=progress,
    )  # fmt: skip
    return annotate(
        teacher,
        load_source(responses),
        root / "annotated",
        top_k=config.top_k,
        top_p=config.top_p,
        shard_size=256,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------- checkpoints
def find_checkpoint(path: str | Path, *, verify: bool = False) -> Path:
    """``path`` itself if it is a complete checkpoint, else the newest complete one under
    ``path/checkpoints``; :class:`~tdrl.errors.CheckpointNotFoundError` if there is none.

    With ``verify`` every file is checked against the checkpoint's manifest (sizes and sha256): a
    damaged checkpoint is skipped with a warning naming the file, and the previous complete one is
    used; if none is intact, the error lists what is wrong with each."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        candidates = [path]
    else:
        candidates = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / COMPLETE).is_file())[::-1]
    if not candidates:
        raise CheckpointNotFoundError(
            f"no complete checkpoint in {path}: pass a run directory written by `tdrl train` or one of its "
            "checkpoints/step-* directories"
        )
    if not verify:
        return candidates[0]
    damaged = []
    for candidate in candidates:
        problems = verify_manifest(candidate)
        if not problems:
            if damaged:
                log.warning("skipping damaged checkpoint(s): %s; using %s", "; ".join(damaged), candidate)
            return candidate
        damaged.append(f"{candidate.name}: {problems[0]}")
    raise CheckpointNotFoundError(f"no intact checkpoint in {path} ({'; '.join(damaged)}): start the run again")


def run_directory(path: str | Path) -> Path:
    """The run directory a path names: a run itself, or the run of a ``checkpoints/step-*`` directory."""
    path = Path(path)
    if (path / COMPLETE).is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


#: What a run writes in its directory (cleared by --overwrite, and when a failed start left them).
RUN_OUTPUTS = ("checkpoints", "best", "summary.json")


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.raised: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised is not None:  # a second Ctrl-C: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        self.raised = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """Train one agent with one seed. ``teacher`` may be passed in to share it between runs."""

    def __init__(self, config: TrainConfig, *, teacher: Teacher | None = None, progress: bool = True):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        agent_cls = get_agent(config.agent)  # an unknown agent fails before any model loads
        config = config.with_agent_defaults(agent_cls.trainer_defaults)  # e.g. bd's J_PT, minillm's collection
        self.config = config
        self.out = Path(config.out)
        # single process by default; under `accelerate launch` / `torchrun` every rank runs this trainer,
        # gradients are averaged by DDP, and only the main process evaluates, logs and checkpoints
        self.accelerator = Accelerator(
            cpu=torch.device(config.device).type == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.progress = progress and self.accelerator.is_main_process
        self.agent_args = parse_agent_args(config.agent_args)
        set_seed(config.seed)
        self.teacher = teacher or load_teacher(config.teacher, dtype=config.teacher_dtype, device=config.device)
        self.student = load_student(config.student, teacher=self.teacher).to(config.device)
        check_same_vocabulary(self.teacher.tokenizer, self.student.tokenizer)
        self.agent = make_agent(config.agent, self.student, **self.agent_args).to(config.device)
        if getattr(self.agent, "uses_teacher", False):  # e.g. kd-online: the teacher runs inside the loss
            self.agent.attach_teacher(self.teacher)
        with self.accelerator.main_process_first():  # one rank builds the cached data, the others read it
            if config.data == "bundled":
                data_dir = prepare_bundled_data(self.teacher, config, self.progress)
            else:
                data_dir = config.data
            if not Path(data_dir).exists():
                raise DataError(
                    f"data directory {data_dir} does not exist: build it with `tdrl annotate` or use --data bundled"
                )
            self.dataset = DistillDataset(data_dir, tokenizer=self.student.tokenizer, top_p=self.agent.config.top_p)
            made_by = self.dataset.meta.get("settings", {}).get("weights")
            if made_by not in (None, self.teacher.weights_fingerprint()):
                raise DataError(
                    f"the annotation cache {data_dir} was made by another teacher (weights {made_by}, this teacher "
                    f"{self.teacher.weights_fingerprint()}): annotate the data with this teacher"
                )
            self.eval_records = reference_records(
                self.teacher, config.eval_data, split=config.eval_split, n=config.eval_prompts,
                max_new_tokens=config.eval_max_new_tokens, reference_column=config.eval_reference_column,
            )  # fmt: skip
        self.sampler = BucketBatchSampler(self.dataset.lengths, config.batch_size, seed=config.seed)
        self.eval_config = EvalConfig(
            max_new_tokens=config.eval_max_new_tokens, seeds=config.seed_list(), top_p=config.eval_top_p,
            temperature=config.eval_temperature, greedy=config.eval_greedy,
        )  # fmt: skip
        self.optimizer = torch.optim.AdamW(
            self.agent.param_groups(config.lr), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(self.agent, self.optimizer)
        self.step = 0
        self.online: list[dict] = []  # the latest student episodes (records), when online_every > 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.train_time = 0.0  # seconds spent in training steps and collection (not eval, not checkpoints)
        self._batches = iter(())
        self.resumed = False  # set by resume(): continue the run in out instead of refusing it

    # ------------------------------------------------------------------ schedule
    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        warmup = min(cfg.warmup_steps, max(cfg.steps // 10, 1))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    def _autocast(self):
        precision = self.config.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        device_type = torch.device(self.config.device).type
        return torch.autocast(device_type=device_type, dtype=dtype)

    def _next_batch(self) -> dict:
        """The next batch of the seeded order (with ``online_ratio`` of it replaced by the latest
        student episodes when online); with several processes, this rank's share of it."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        for _ in range(2):
            for indices in self._batches:
                items = [self.dataset[i] for i in indices]
                if self.online:
                    n_online = round(self.config.online_ratio * len(items))
                    rng = np.random.default_rng([self.config.seed, self.step, 1])
                    picks = rng.choice(len(self.online), size=n_online, replace=n_online > len(self.online))
                    items = items[: len(items) - n_online] + [record_tensors(self.online[i]) for i in picks]
                mine = items[rank::world] or items[:1]
                return collate(mine, self.teacher.pad_token_id)
            self._batches = iter(self.sampler)  # the rest of the epoch (or the next epoch)
        raise DataError("the training data yields no batches")

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run to ``config.steps``; returns the summary (also written to ``out/summary.json``). The run
        directory is locked for the duration (a second writer gets an error) and must not hold
        another run (see :meth:`_claim_run_directory`)."""
        if not self.accelerator.is_main_process:
            return self._train()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file: choose a directory")
        with DirectoryLock(self.out, "run directory"):
            self._claim_run_directory()
            return self._train()

    def _claim_run_directory(self) -> None:
        """One run per directory: refuse to start a new run over an existing one unless resuming it or
        told to ``overwrite``; clear what a failed start left behind (no checkpoint, no summary)."""
        out = self.out
        has_run = (out / "summary.json").is_file() or any((out / "checkpoints").glob("step-*"))
        if self.resumed:
            return
        if has_run and not self.config.overwrite:
            raise ConfigError(
                f"{out} already holds a run: continue it with `tdrl train --resume {out}`, replace it with "
                "--overwrite, or choose another --out"
            )
        if out.is_dir():
            for name in RUN_OUTPUTS:
                target = out / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            for events in out.glob("events.out.tfevents.*"):
                events.unlink()

    def _train(self) -> dict:
        cfg = self.config
        main = self.accelerator.is_main_process
        self.out.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(self.out) if main else None
        self._batches = iter(self.sampler)
        started = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        interrupted = False
        bar = self._bar()
        try:
            with _StopSignal() as stop:
                while self.step < cfg.steps:
                    step_start = time.perf_counter()
                    rollout_metrics = None
                    if cfg.online_every and self.step % cfg.online_every == 0:
                        rollout_metrics = self.collect_online()
                    log = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
                    metrics, tokens = self._train_step(log)
                    self.train_time += time.perf_counter() - step_start
                    if main and rollout_metrics is not None:
                        tracker.scalars(rollout_metrics, self.step)
                    self.step += 1
                    window_tokens += tokens
                    if bar is not None:
                        bar.update(1)
                    if log:
                        elapsed = time.perf_counter() - window_start
                        metrics = {k: float(v) for k, v in metrics.items()}  # the one device sync per log step
                        metrics["perf/tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                        if main:
                            tracker.scalars(metrics, self.step)
                        window_tokens, window_start = 0, time.perf_counter()
                    if main and ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps):
                        self._evaluate(tracker)
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or stop.raised:
                        if main:
                            self.save_checkpoint()
                        self.accelerator.wait_for_everyone()
                    if stop.raised:
                        interrupted = True
                        break
        finally:
            if bar is not None:
                bar.close()
        summary = self._summary(time.perf_counter() - started, interrupted)
        if self.accelerator.num_processes > 1:  # every rank must end with the same weights
            from accelerate.utils import gather_object

            from tdrl.data import model_fingerprint

            summary["rank_fingerprints"] = gather_object([model_fingerprint(self.agent)])
        if main:
            if not interrupted:
                summary.update(self.probe())
                if cfg.test_prompts:
                    summary["test"] = self.test()
                    for which, group in (("last", "test"), ("best", "test_best")):
                        tracker.scalars({k.replace("eval/", f"{group}/"): v for k, v in summary["test"][which].items()},
                                        self.step)  # fmt: skip
                last = self.history[-1]["metrics"] if self.history else {}
                final = {**last, **{f"best_{k}": v for k, v in (self.best or {}).get("metrics", {}).items()}}
                for which, metrics in (summary.get("test") or {}).items():
                    if isinstance(metrics, dict):
                        final.update({f"test_{which}_{k.split('/')[1]}": v for k, v in metrics.items()})
                tracker.hparams(self._hparams(), final)
            tracker.close()
            write_json_atomic(self.out / "summary.json", summary)
        if interrupted:
            raise KeyboardInterrupt(f"interrupted at step {self.step}; resume with --resume {self.out}")
        return summary

    def _bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=f"{self.config.agent} seed {self.config.seed}",
            unit="step",
            leave=False,
        )

    def _train_step(self, log: bool) -> tuple[dict[str, torch.Tensor], int]:
        """One optimiser step over ``grad_accum`` micro-batches. Metrics stay tensors (no device sync)
        until the caller logs them; with ``log`` the last micro-batch adds the agent's diagnostics."""
        cfg = self.config
        self.agent.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            with self._autocast():
                loss, metrics = self.model(batch, diagnostics=log and micro == cfg.grad_accum - 1)
                _check_metric_names(metrics)
                if cfg.lm_coef > 0:
                    lm_loss, lm_metrics = self._lm_loss()
                    loss = loss + cfg.lm_coef * lm_loss
                    metrics.update(lm_metrics)
            self.accelerator.backward(loss / cfg.grad_accum)
            metrics = {"train/loss": loss.detach(), **metrics, **_batch_metrics(batch)}
            for key, value in metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32).detach()
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
            tokens += int(batch["response_mask"].sum())
        params = [p for p in self.agent.parameters() if p.requires_grad]
        if cfg.max_grad_norm > 0:
            totals["train/grad_norm"] = self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        totals["train/lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.agent.after_update()
        return totals, tokens

    def _lm_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MiniLLM's pre-training term J_PT on a plain-text corpus: 0.5 * next-token NLL + 0.5 * KD
        (cross-entropy from the teacher's top-k, renormalised, to the student's full-vocabulary policy).
        The student's normaliser is the chunked one (no ``[B, T, V]`` tensor); the teacher's top-k of
        each corpus chunk is computed once and kept (the corpus is fixed, the teacher frozen)."""
        cfg = self.config
        if not hasattr(self, "_lm_chunks"):
            self._lm_chunks = lm_chunks(self.teacher.tokenizer, cfg.lm_corpus, cfg.lm_seq_len)
            self._lm_targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        rng = np.random.default_rng([cfg.seed, self.step, 2])
        picks = rng.choice(
            len(self._lm_chunks), size=cfg.lm_batch_size, replace=len(self._lm_chunks) < cfg.lm_batch_size
        )
        missing = [int(i) for i in dict.fromkeys(picks.tolist()) if int(i) not in self._lm_targets]
        if missing:
            subset = self.teacher.annotate(self._lm_chunks[missing], top_k=cfg.top_k, top_p=1.0).subset
            for j, i in enumerate(missing):
                self._lm_targets[i] = (subset.ids[j, :-1].cpu(), subset.logprobs[j, :-1].cpu())
        device = self.student.device
        ids = self._lm_chunks[torch.as_tensor(picks)].to(device)
        cand = torch.stack([self._lm_targets[int(i)][0] for i in picks]).to(device)
        target = torch.softmax(torch.stack([self._lm_targets[int(i)][1] for i in picks]).to(device), -1)
        student = self.student
        hidden = student.hidden_states(ids)[:, :-1]
        weight, bias = student.output_weight(), student.output_bias()
        log_z = vocab_logsumexp(hidden, weight, bias, chunk=getattr(self.agent.config, "vocab_chunk", VOCAB_CHUNK))
        nll = (log_z - gather_logits(hidden, weight, bias, ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()).mean()
        cand_logp = gather_logits(hidden, weight, bias, cand).float() - log_z.unsqueeze(-1)
        kd = -(target * cand_logp).sum(-1).mean()
        loss = 0.5 * nll + 0.5 * kd
        return loss, {"loss/lm": loss.detach(), "loss/lm_nll": nll.detach(), "loss/lm_kd": kd.detach()}

    def collect_online(self) -> dict[str, float]:
        """Student episodes through the vector env (the teacher scores and masks every step); they
        replace the online buffer. Returns the ``rollout/*`` metrics."""
        from tdrl.envs import TokenGenerationVectorEnv, rollout

        cfg = self.config
        env = TokenGenerationVectorEnv(
            self.teacher,
            self._online_prompts(),
            num_envs=cfg.online_envs,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=cfg.online_max_new_tokens,
        )
        seed = cfg.seed * 1_000_003 + self.step
        policy = StudentPolicy(self.agent, seed=seed, teacher_mix=getattr(self.agent.config, "teacher_mix", 0.0))
        self.online = rollout(env, policy, cfg.online_episodes, seed=seed)
        lengths = [len(r["response_ids"]) for r in self.online]
        inside = sum(sum(r["action_in_cand"]) for r in self.online)
        return {
            "rollout/return": float(np.mean([r["return"] for r in self.online])),
            "rollout/length": float(np.mean(lengths)),
            "rollout/coverage": inside / max(sum(lengths), 1),
            "rollout/off_support_rate": 1.0 - inside / max(sum(lengths), 1),
        }

    def _online_prompts(self) -> list[str]:
        """Prompts of the training data (first 512 distinct) for online episodes."""
        if not hasattr(self, "_prompt_pool"):
            self._prompt_pool = list(dict.fromkeys(self.dataset.data["prompt"]))[:512]
        return self._prompt_pool

    def _evaluate(self, tracker: Tracker) -> dict[str, float]:
        metrics, samples = evaluate(
            self.student.model, self.student.tokenizer, self.teacher, self.eval_records, self.eval_config,
            decode_temperature=self.agent.decode_temperature,
        )  # fmt: skip
        tracker.scalars(metrics, self.step)
        tracker.text("samples", samples_markdown(samples), self.step)
        self.history.append({"step": self.step, "train_time_s": self.train_time, "metrics": metrics})
        if self.best is None or metrics["eval/rougeL"] > self.best["metrics"]["eval/rougeL"]:
            self.best = {"step": self.step, "metrics": metrics}
            self._export(self.out / "best", metrics)
        return metrics

    def test(self) -> dict:
        """The last and the best-validation model on ``test_prompts`` of ``--test-data`` (sampled with the
        evaluation settings, plus one greedy pass): ``{"last", "best", "best_step"}``. This, not the
        validation score that selected the best model, is what a comparison reports."""
        from transformers import AutoModelForCausalLM

        cfg = self.config
        records = reference_records(
            self.teacher, cfg.test_data, split=cfg.test_split, n=cfg.test_prompts,
            max_new_tokens=cfg.eval_max_new_tokens, reference_column=cfg.eval_reference_column,
        )  # fmt: skip
        config = dataclasses.replace(self.eval_config, also_greedy=True)
        run = lambda model: evaluate(  # noqa: E731
            model,
            self.student.tokenizer,
            self.teacher,
            records,
            config,
            decode_temperature=self.agent.decode_temperature,
        )[0]
        last = run(self.student.model)
        best_step = (self.best or {}).get("step")
        if best_step is None or best_step == self.step:
            return {"last": last, "best": last, "best_step": best_step}
        best_model = AutoModelForCausalLM.from_pretrained(str(self.out / "best"), dtype=torch.float32)
        return {"last": last, "best": run(best_model.to(self.student.device)), "best_step": best_step}

    @torch.no_grad()
    def probe(self, n: int = 64) -> dict[str, float]:
        """The decoding policy's ``outside_mass`` (its exact mass outside A_p(s)) and ``mode_outside``
        (how often its most likely token lies outside A_p(s)) over the response states of the first ``n``
        training records: one fixed probe, comparable across agents and with the start."""
        totals, states = {"outside_mass": 0.0, "mode_outside": 0.0}, 0
        for start in range(0, min(n, len(self.dataset)), 8):
            rows = range(start, min(start + 8, n, len(self.dataset)))
            t = self.agent.transitions(collate([self.dataset[i] for i in rows], self.teacher.pad_token_id))
            found = self.agent.diagnostics(t)
            for key in totals:
                totals[key] += float(found[f"policy/{key}"]) * t.n
            states += t.n
        return {key: value / max(states, 1) for key, value in totals.items()}

    def _export(self, target: Path, metrics: dict) -> None:
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        self.student.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps({"step": self.step, "metrics": metrics}, indent=2))
        (tmp / RUN_FILE).write_text(json.dumps(self._run_info(), indent=2))
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)

    def _run_info(self) -> dict:
        """What an exported student came from (:data:`RUN_FILE`)."""
        return {"teacher": self.config.teacher, "teacher_dtype": self.config.teacher_dtype, "agent": self.config.agent,
                "decode_temperature": self.agent.decode_temperature, "step": self.step}  # fmt: skip

    def _summary(self, wall_time: float, interrupted: bool) -> dict:
        return {
            "agent": self.config.agent,
            "seed": self.config.seed,
            "steps": self.step,
            "interrupted": interrupted,
            "wall_time_s": wall_time,
            "train_time_s": self.train_time,
            "last": self.history[-1] if self.history else None,
            "best": self.best,
            "history": self.history,
            "config": self.config.to_dict(),
        }

    def _hparams(self) -> dict:
        keep = ("agent", "agent_args", "student", "teacher", "seed", "steps", "batch_size", "lr", "top_k", "top_p")
        return {k: v for k, v in self.config.to_dict().items() if k in keep}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically and keep the newest ``keep_last``."""
        from safetensors.torch import save_model

        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-{self.step}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_model(self.agent, str(tmp / "agent.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
            self.student.save_pretrained(tmp / "student")
            (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            (tmp / RUN_FILE).write_text(json.dumps(self._run_info(), indent=2))
            state = {
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "history": self.history,
                "best": self.best,
                "online": self.online,
                "train_time_s": self.train_time,
                "data_fingerprint": self.dataset.meta.get("fingerprint"),
                "teacher_weights": self.teacher.weights_fingerprint(),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            write_manifest(tmp, skip=(COMPLETE,))
            (tmp / COMPLETE).write_text(json.dumps({"step": self.step}))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def resume(
        cls, path: str | Path, *, teacher: Teacher | None = None, progress: bool = True, steps: int | None = None
    ) -> Trainer:
        """A trainer restored from the newest intact checkpoint under ``path`` (or ``path`` itself),
        writing to the run directory ``path`` names (not the one stored in the checkpoint: a copied run
        resumes in its copy). Every checkpoint file is verified against the manifest first, and the
        data cache and the teacher must be the ones the run started with. ``steps`` may extend the run."""
        from safetensors.torch import load_model

        checkpoint = find_checkpoint(path, verify=True)
        config = TrainConfig(**read_json(checkpoint / "config.json", "checkpoint config"))
        config.out = str(run_directory(path))
        if steps is not None:
            config.steps = steps
        state = read_json(checkpoint / "trainer_state.json", "checkpoint state")
        trainer = cls(config, teacher=teacher, progress=progress)
        for key, now, what in (
            ("data_fingerprint", trainer.dataset.meta.get("fingerprint"), "the annotation cache"),
            ("teacher_weights", trainer.teacher.weights_fingerprint(), "the teacher's weights"),
        ):
            if state.get(key) not in (None, now):
                raise ConfigError(
                    f"{what} changed since {checkpoint} was written ({state[key]} then, {now} now): resume with "
                    "the data and teacher the run started with, or start a new run"
                )
        load_model(trainer.agent, str(checkpoint / "agent.safetensors"))
        trainer.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        trainer.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True)["torch"])
        trainer.step, trainer.history, trainer.best = state["step"], state["history"], state["best"]
        trainer.online = state.get("online", [])
        trainer.train_time = state.get("train_time_s", 0.0)
        trainer.sampler.load_state_dict(state["sampler"])
        trainer.resumed = True
        if trainer.step > config.steps:
            raise ConfigError(f"checkpoint is at step {trainer.step}, past --steps {config.steps}")
        return trainer


def lm_chunks(tokenizer, corpus: str, seq_len: int) -> torch.Tensor:
    """``[N, seq_len]`` token chunks of a plain-text corpus ('pydoc': the standard library's
    ``pydoc_data.topics`` text, always available offline; else a path to a UTF-8 text file)."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
    else:
        path = Path(corpus)
        if not path.is_file():
            raise DataError(f"lm_corpus {corpus!r} is neither 'pydoc' nor an existing text file")
        text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"lm_corpus {corpus!r} has fewer than lm_seq_len={seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class StudentPolicy:
    """The student as an env policy (batched observations), sampling the way it decodes: from its
    policy over the whole vocabulary (``agent.policy_logits`` / ``temperature``), so it may leave
    A_p(s) (the env flags it). With ``teacher_mix`` alpha > 0 (MiniLLM) it samples from
    mu = alpha pi_T + (1 - alpha) pi_S, the teacher part renormalised on the observation's A_p(s).
    After each call ``last_extras`` holds, per row, ``behaviour_logprob`` = log mu(a|s) and
    ``student_logprob`` = log pi_S(a|s) of the chosen tokens; :func:`~tdrl.envs.rollout` stores them in
    the episode records (importance ratios when the episodes are reused)."""

    def __init__(self, agent, seed: int = 0, temperature: float = 1.0, teacher_mix: float = 0.0):
        self.agent, self.temperature, self.teacher_mix = agent, temperature, teacher_mix
        self.generator = torch.Generator().manual_seed(seed)
        self.last_extras: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def __call__(self, obs: dict) -> np.ndarray:
        student = self.agent.student
        ids = torch.as_tensor(np.atleast_2d(obs["input_ids"]), device=student.device)
        lengths = torch.as_tensor(np.atleast_1d(obs["length"]), device=student.device)
        mask = (torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(-1)).long()
        was_training = student.training
        student.eval()
        try:
            hidden = student.hidden_states(ids, mask)
        finally:
            student.train(was_training)
        last = hidden[torch.arange(ids.shape[0]), lengths - 1]
        probs = torch.softmax(self.agent.policy_logits(last).float().cpu() / self.temperature, -1)
        behaviour = probs
        if self.teacher_mix > 0:
            cand = torch.as_tensor(np.atleast_2d(obs["cand_ids"])).long()
            teacher = torch.softmax(torch.as_tensor(np.atleast_2d(obs["cand_logprobs"])).float(), -1)
            teacher_full = torch.zeros_like(probs).scatter_add_(-1, cand, teacher)
            behaviour = self.teacher_mix * teacher_full + (1 - self.teacher_mix) * probs
        actions = torch.multinomial(behaviour, 1, generator=self.generator)
        self.last_extras = {
            "behaviour_logprob": behaviour.gather(-1, actions).squeeze(-1).clamp_min(1e-30).log().numpy(),
            "student_logprob": probs.gather(-1, actions).squeeze(-1).clamp_min(1e-30).log().numpy(),
        }
        actions = actions.squeeze(-1).numpy()
        return actions if np.ndim(obs["length"]) else actions[0]


def _batch_metrics(batch: dict) -> dict[str, torch.Tensor]:
    """What the trainer logs about each batch (group ``batch/``; agents never use it)."""
    sel = batch["response_mask"].bool()
    mask = batch["cand_mask"][sel]
    mass = torch.where(mask, batch["cand_logprobs"][sel].exp(), torch.zeros_like(mask, dtype=torch.float32))
    return {
        "batch/support_size": mask.sum(-1).float().mean(),
        "batch/support_mass": mass.sum(-1).mean(),
        "batch/off_support_frac": 1.0 - batch["action_in_cand"][sel].float().mean(),
    }


def _check_metric_names(metrics: dict) -> None:
    """Agent metrics and trainer metrics never share a key: the trainer's groups are reserved."""
    for key in metrics:
        if key.startswith(TRAINER_METRIC_GROUPS):
            raise ConfigError(
                f"agent metric {key!r} uses a group the trainer logs itself ({', '.join(TRAINER_METRIC_GROUPS)}): "
                "rename it"
            )
