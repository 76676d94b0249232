"""The agent-agnostic training loop, on accelerate's plumbing.

:class:`Trainer` takes objects (an agent, the teacher, a training dataset, evaluation records, the
arguments, callbacks); :func:`tdrl.training.build.build_trainer` resolves names into them for the CLI. The trainer owns
optimisation and data order; ``accelerate`` does the plumbing: ``Accelerator(mixed_precision=...)``
(bf16 or fp16 with loss scaling), ``accumulate()`` (no gradient all-reduce on the micro-batches that do
not step), a prepared DataLoader over the seeded bucketing batch sampler, ``skip_first_batches`` to
resume mid-epoch, ``save_state`` / ``load_state`` (whole weights, every process's RNGs) under the checkpoints
of :mod:`tdrl.training.checkpoints`; ``--fsdp``: :mod:`tdrl.training.sharding`. The schedule is
``transformers.get_scheduler``. A resumed run ends with an uninterrupted one's weights (tested bit for bit).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from tdrl.agents.base import Agent
from tdrl.data import BucketBatchSampler, DistillDataset, batch_statistics, collate
from tdrl.errors import ConfigError, NonFiniteError
from tdrl.evaluation import Evaluator, records_digest, support_probe
from tdrl.integrity import DirectoryLock, write_json_atomic
from tdrl.models import Teacher, load_student
from tdrl.records import record_tensors
from tdrl.training.callbacks import TensorBoardCallback, TrainerCallback
from tdrl.training.checkpoints import claim_run_directory, load_checkpoint, save_checkpoint
from tdrl.training.config import TrainConfig, check_device
from tdrl.training.online import PretrainText, collect_episodes
from tdrl.training.plumbing import SCHEDULES, all_finite, check_metric_names, make_accelerator
from tdrl.training.resume import ResumePoint, best_unavailable, continue_run, export_best
from tdrl.training.sharding import rank_fingerprints, whole_weights
from tdrl.training.signals import StopSignal
from tdrl.training.state import SUMMARY_FILE, Evaluation, RunInfo, RunSummary, TestResult, TrainerState

__all__ = ["Trainer"]


class Trainer:
    """Train one agent with one seed.

    Args:
        agent: the agent (its student inside), on ``args.device``.
        teacher: the teacher (references, evaluation, online episodes, J_PT; not trained).
        train_dataset: a :class:`~tdrl.data.DistillDataset` (the annotation cache).
        eval_records: validation records (:func:`~tdrl.evaluation.reference_records`): model selection.
        args: the run's :class:`~tdrl.training.config.TrainConfig`, resolved here against the agent.
        test_records: scored at the end, last and best-validation model (None: no test evaluation).
        callbacks: :class:`~tdrl.training.callbacks.TrainerCallback` s (main process); TensorBoard always.

    The loop's state is one :class:`~tdrl.training.state.TrainerState` (``trainer.state``), checkpointed.
    """

    def __init__(
        self,
        agent: Agent,
        teacher: Teacher,
        train_dataset: DistillDataset,
        eval_records: list[dict],
        args: TrainConfig,
        *,
        test_records: list[dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        progress: bool = True,
    ):
        from torch.utils.data import DataLoader
        from transformers import get_scheduler

        if args.agent != type(agent).name:
            raise ConfigError(f"args.agent is {args.agent!r} but the agent is {type(agent).name!r}: make them agree")
        args = args.replace(agent_config=agent.config).resolve(type(agent))
        check_device(args.device)
        self.args = args
        self.agent, self.student, self.teacher = agent, agent.student, teacher
        self.dataset, self.eval_records, self.test_records = train_dataset, eval_records, test_records
        self.out = Path(args.out)
        self.accelerator = make_accelerator(args)
        self.progress = progress and self.accelerator.is_main_process
        self.callbacks = [TensorBoardCallback(), *(callbacks or [])]
        self.validation = self._evaluator(eval_records, args.eval.protocol())
        # the test's protocol: the validation's, with the test seeds and one greedy pass
        protocol = args.eval.protocol(seeds=args.test_seeds, also_greedy=True)
        self.testing = self._evaluator(test_records, protocol) if test_records else None
        self.sampler = BucketBatchSampler(train_dataset.lengths, args.optim.batch_size, seed=args.seed)
        loader = DataLoader(train_dataset, batch_sampler=self.sampler, collate_fn=list)
        optim = args.optim
        optimizer = torch.optim.AdamW(
            agent.param_groups(optim.lr),
            lr=optim.lr,
            betas=(optim.adam_beta1, optim.adam_beta2),
            weight_decay=optim.weight_decay,
        )
        self.model, self.optimizer, self.loader = self.accelerator.prepare(
            agent, optimizer, loader, device_placement=[True, True, False]
        )
        self.scheduler = get_scheduler(
            SCHEDULES[optim.schedule], optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=optim.steps
        )
        lm = args.lm
        self.pretrain = None
        if lm.coef > 0:
            self.pretrain = PretrainText(
                teacher, lm.corpus, lm.seq_len, lm.batch_size, args.data.annotation_top_k, args.seed
            )
        self.state = TrainerState(
            data_fingerprint=train_dataset.meta.get("fingerprint"), teacher_weights=teacher.weights_fingerprint()
        )
        self.state.eval_records, self.state.test_records = records_digest(eval_records), records_digest(test_records)
        self._prompts: list[str] | None = None  # prompts of online episodes (first 512 distinct training prompts)
        self.resumed: ResumePoint | None = None  # set by load_checkpoint(): continue the run in out
        self._last_loss = float("nan")  # the last logged train/loss (named when a run diverges)

    @property
    def step(self) -> int:
        """Optimiser steps taken (``state.step``)."""
        return self.state.step

    # ------------------------------------------------------------------ data
    def _batches(self):
        """Micro-batches of the seeded order, epoch after epoch; a resumed run skips what it consumed."""
        state = self.state
        while True:
            self.loader.set_epoch(state.epoch)  # accelerate's loader re-sets the sampler's epoch from its own
            self.sampler.set_epoch(state.epoch)
            skip = state.consumed
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for items in loader:
                state.consumed += 1
                yield items
            state.epoch, state.consumed = state.epoch + 1, 0

    def _collate(self, items: list[dict], micro: int) -> dict:
        """A batch of the data order, ``online_ratio`` of it the latest student episodes (seeded by the step)."""
        online = self.state.online
        if online:
            n_online = round(self.args.online.ratio * len(items))
            rng = np.random.default_rng([self.args.seed, self.state.step, micro, 1])
            picks = rng.choice(len(online), size=n_online, replace=n_online > len(online))
            items = items[: len(items) - n_online] + [record_tensors(online[i]) for i in picks]
        return collate(items, self.teacher.pad_token_id, top_p=self.agent.config.top_p)

    @property
    def top_p(self) -> float:
        """The top-p MDP's p: the agent's re-cut (``top_p``, :func:`tdrl.records.recut`), else the cache's own."""
        if self.agent.config.top_p is not None:
            return self.agent.config.top_p
        return self.dataset.meta.get("settings", {}).get("top_p", self.args.data.annotation_top_p)

    # ------------------------------------------------------------------ loop
    def train(self) -> RunSummary:
        """Run to ``optim.steps``; returns the RunSummary (also ``out/summary.json``). The run directory is
        locked meanwhile and claimed first (:func:`~tdrl.training.checkpoints.claim_run_directory`,
        :func:`~tdrl.training.resume.continue_run`)."""
        if not self.accelerator.is_main_process:
            return self._train()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file: choose a directory")
        with DirectoryLock(self.out, "run directory"):
            claim_run_directory(self.out, resumed=self.resumed is not None, overwrite=self.args.overwrite)
            continue_run(self.out, self.resumed)  # a resume: what is newer than its checkpoint, and best/
            return self._train()

    def _train(self) -> RunSummary:
        args, state, main = self.args, self.state, self.accelerator.is_main_process
        steps = args.optim.steps
        callbacks = self.callbacks if main else []
        for callback in callbacks:
            callback.on_train_begin(args, state)
        batches = self._batches()
        started = time.perf_counter()
        window_tokens, window_start, interrupted = 0, time.perf_counter(), False
        bar = self._bar()
        if state.step == 0 and args.eval.every and args.eval.on_start:
            self._evaluate(callbacks)  # the starting student: step 0 of every curve
        try:
            with StopSignal() as stop:
                while state.step < steps:
                    step_start = time.perf_counter()
                    if args.online.every and state.step % args.online.every == 0:
                        with whole_weights(self.model):  # FSDP: each process samples alone
                            rollout_metrics = self._collect_online()
                        for callback in callbacks:
                            callback.on_log(args, state, rollout_metrics)
                    log = (state.step + 1) % args.log_every == 0 or state.step + 1 == steps
                    metrics, tokens = self._train_step(batches, log)
                    state.train_time_s += time.perf_counter() - step_start
                    state.step += 1
                    window_tokens += tokens
                    if bar is not None:
                        bar.update(1)
                    for callback in callbacks:
                        callback.on_step_end(args, state)
                    if log:
                        metrics = {k: float(v) for k, v in metrics.items()}  # the one device sync per log step
                        self._last_loss = metrics["train/loss"]
                        if not math.isfinite(metrics["train/loss"]):
                            raise self._diverged(f"train/loss is {metrics['train/loss']}")
                        metrics["perf/tokens_per_s"] = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                        for callback in callbacks:
                            callback.on_log(args, state, metrics)
                        window_tokens, window_start = 0, time.perf_counter()
                    if (args.eval.every and state.step % args.eval.every == 0) or state.step == steps:
                        self._evaluate(callbacks)
                    if state.step % args.checkpoint_every == 0 or state.step == steps or stop.raised:
                        if not all_finite(self.agent.parameters()):  # a diverged run never writes a checkpoint
                            raise self._diverged("the weights are no longer finite")
                        self.save_checkpoint()
                    if stop.raised:
                        interrupted = True
                        break
        finally:
            if bar is not None:
                bar.close()
        wall_time = time.perf_counter() - started
        summary = RunSummary.of(args.to_dict(), state, interrupted=interrupted, wall_time_s=wall_time)
        summary.rank_fingerprints = rank_fingerprints(self.accelerator, self.agent)  # every rank: the same weights
        with whole_weights(self.model):  # FSDP: every process gathers, the main process probes and tests
            if main and not interrupted:
                summary.probe = self.probe()
                summary.test = self.test() if self.test_records else summary.test
        if main:
            for callback in callbacks:
                callback.on_train_end(args, state, summary)
            write_json_atomic(self.out / SUMMARY_FILE, summary.to_dict())
        if interrupted:
            raise KeyboardInterrupt(f"interrupted at step {state.step}; resume with --resume {self.out}")
        return summary

    def _diverged(self, what: str, step: int | None = None) -> NonFiniteError:
        """The error of a run whose loss or weights left the finite numbers: the loss, and what is intact."""
        kept = sorted(p.name for p in (self.out / "checkpoints").glob("step-*"))
        return NonFiniteError(
            f"training diverged at step {step or self.state.step}: {what} (last logged train/loss {self._last_loss}); "
            + (f"the last checkpoint ({kept[-1]}) is intact" if kept else "no checkpoint was written")
            + f"; none with non-finite weights is written: lower --lr (now {self.args.optim.lr:g}) or check the loss"
        )

    def _bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        desc = f"{self.args.agent} seed {self.args.seed}"
        return tqdm(total=self.args.optim.steps, initial=self.state.step, desc=desc, unit="step", leave=False)

    def _train_step(self, batches, log: bool) -> tuple[dict[str, torch.Tensor], int]:
        """One optimiser step over ``grad_accum`` micro-batches inside ``accelerator.accumulate`` (the
        gradients are all-reduced only on the micro-batch that steps). Metrics stay tensors (no device
        sync) and are gathered on ``log`` steps only, where the last micro-batch adds the diagnostics."""
        optim, accum = self.args.optim, self.args.optim.grad_accum
        self.agent.train()
        totals: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(accum):
            batch = self._collate(next(batches), micro)
            index = self.state.step * accum + micro  # J_PT's chunks: drawn by the micro-batch counter
            auxiliary = [self.pretrain.term(index, self.args.lm.coef)] if self.pretrain else []
            with self.accelerator.accumulate(self.model):
                loss, metrics = self.model(batch, diagnostics=log and micro == accum - 1, auxiliary=auxiliary)
                check_metric_names(metrics)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    params = [p for p in self.agent.parameters() if p.requires_grad]
                    clip = optim.max_grad_norm if optim.max_grad_norm > 0 else math.inf  # inf: the norm, no clipping
                    norm = totals["train/grad_norm"] = self.accelerator.clip_grad_norm_(params, clip)
                    # one sync per step, so nothing non-finite reaches the weights (fp16's scaler skips its own)
                    if optim.mixed_precision != "fp16" and not bool(torch.isfinite(norm)):
                        bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
                        what = f"the gradient norm is {float(norm)} (loss {float(loss)}; non-finite: {bad or 'none'})"
                        raise self._diverged(what, step=self.state.step + 1)
                    totals["train/lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if log:  # the caller reads the metrics on log steps only
                stats = {f"batch/{k}": v for k, v in batch_statistics(batch).items()}
                for key, value in {"train/loss": loss.detach(), **metrics, **stats}.items():
                    value = torch.as_tensor(value, dtype=torch.float32).detach()
                    totals[key] = totals.get(key, 0.0) + value / accum
            tokens += int(batch["response_mask"].sum())
        self.scheduler.step()
        self.agent.after_update()
        return totals, tokens

    def _collect_online(self) -> dict[str, float]:
        """Student episodes replace the online buffer (prompts: the first 512 distinct training prompts)."""
        online = self.args.online
        if self._prompts is None:
            self._prompts = list(dict.fromkeys(self.dataset.data["prompt"]))[:512]
        self.state.online, metrics = collect_episodes(
            self.agent,
            self.teacher,
            self._prompts,
            num_envs=online.envs,
            episodes=online.episodes,
            max_new_tokens=online.max_new_tokens,
            top_p=self.top_p,
            top_k=self.dataset.meta.get("settings", {}).get("top_k", self.args.data.annotation_top_k),  # the cache's K
            seed=self.args.seed * 1_000_003 + self.state.step,
        )
        return metrics

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, callbacks) -> None:
        """Validation (main process), history, and best-model selection on ``metric_for_best_model``;
        every process takes part in exporting a new best (its weights are gathered whole)."""
        from accelerate.utils import broadcast_object_list

        state, settings = self.state, self.args.eval
        improved = [False]
        with whole_weights(self.model):  # FSDP: every process gathers, the main process evaluates
            metrics, samples = self.validation.run() if self.accelerator.is_main_process else (None, None)
        if self.accelerator.is_main_process:
            for callback in callbacks:
                callback.on_evaluate(self.args, state, metrics, samples)
            record = Evaluation(step=state.step, metrics=metrics, train_time_s=state.train_time_s)
            state.history.append(record)
            key = settings.metric_for_best_model
            if key not in metrics:
                raise ConfigError(f"metric_for_best_model {key!r} is not an evaluation metric: {sorted(metrics)}")
            if state.improves(metrics, key, settings.greater_is_better):
                state.best = record
                improved = [True]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(improved)
        if improved[0]:
            weights = self.accelerator.get_state_dict(self.model)
            if self.accelerator.is_main_process:
                export_best(self.student, weights, self.out, state.best, self.run_info())

    def _evaluator(self, records: list[dict], protocol) -> Evaluator:
        """One evaluator per record set: the student's model wrapped once, its weights read at each run."""
        model, tokenizer, temperature = self.student.model, self.student.tokenizer, self.agent.decode_temperature
        return Evaluator(model, tokenizer, self.teacher, records, protocol, decode_temperature=temperature)

    def test(self, greedy: bool = True, seeds: list[int] | None = None) -> TestResult:
        """The last and the best-validation model on the test records (sampled with the evaluation
        settings and ``seeds``, default the test seeds, plus one greedy pass unless ``greedy`` is False).
        This, not the validation score that selected the best model, is what a comparison reports."""
        if self.testing is None:
            raise ConfigError("this trainer has no test records (test_prompts 0): nothing to test")
        last = self.testing.run(seeds=seeds, also_greedy=greedy)[0]
        best_step = self.state.best.step if self.state.best else None
        if best_step is None or best_step == self.state.step:
            return TestResult(last=last, best=last, best_step=best_step)
        if missing := best_unavailable(self.out, self.state.best):  # a resume lost its weights: never test others
            return TestResult(last=last, best={}, best_step=best_step, best_unavailable=missing)
        best_model = load_student(str(self.out / "best"), self.teacher).model  # merged or a LoRA adapter export
        best = self.testing.run(best_model.to(self.student.device), seeds=seeds, also_greedy=greedy)[0]
        return TestResult(last=last, best=best, best_step=best_step)

    def probe(self, n: int = 64) -> dict[str, float]:
        """Outside mass and mode outside on the first ``n`` training rows (:func:`~tdrl.evaluation.support_probe`)."""
        return support_probe(self.agent, self.dataset, self.teacher.pad_token_id, n)

    # ------------------------------------------------------------------ records and checkpoints
    def run_info(self) -> RunInfo:
        """What an exported student came from (:data:`~tdrl.training.state.RUN_FILE`)."""
        args = self.args
        return RunInfo(
            teacher=args.teacher,
            teacher_dtype=args.teacher_dtype,
            agent=args.agent,
            decode_temperature=self.agent.decode_temperature,
            step=self.state.step,
        )

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically (:func:`tdrl.training.checkpoints.save_checkpoint`)."""
        return save_checkpoint(
            self.accelerator,
            self.model,
            self.scheduler,
            self.student,
            self.out,
            state=self.state,
            config=self.args.to_dict(),
            run_info=self.run_info(),
            keep_last=self.args.keep_last,
        )

    def load_checkpoint(self, checkpoint: Path, *, explicit: bool = False, discard_newer: bool = False) -> None:
        """Restore a verified checkpoint (:func:`tdrl.training.checkpoints.load_checkpoint`): the run continues
        from it in ``out`` (:class:`~tdrl.training.resume.ResumePoint`: ``explicit``, ``discard_newer``)."""
        self.state = load_checkpoint(
            self.accelerator, self.scheduler, checkpoint, expected=self.state, max_step=self.args.optim.steps
        )
        self.resumed = ResumePoint(self.state.step, self.state.best, explicit=explicit, discard_newer=discard_newer)
