"""The agent-agnostic training loop, on accelerate's plumbing.

:class:`Trainer` takes objects (an agent, the teacher, a training dataset, evaluation records, the
arguments, callbacks); :func:`tdrl.training.build.build_trainer` resolves names into them for the CLI. The trainer owns
optimisation and data order; ``accelerate`` does the plumbing: ``Accelerator(mixed_precision=...)``
(bf16 or fp16 with loss scaling), ``accumulate()`` (no gradient all-reduce on the micro-batches that do
not step), a prepared DataLoader over the seeded bucketing batch sampler, ``skip_first_batches`` to
resume mid-epoch, and ``save_state`` / ``load_state`` (whole weights under FSDP and DeepSpeed, every
process's RNGs) under the checkpoints of :mod:`tdrl.training.checkpoints`. The schedule is
``transformers.get_scheduler``. An interrupted and resumed run ends with the weights of an
uninterrupted one (tested bit for bit).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from tdrl.agents.base import TRAINER_METRIC_GROUPS, Agent
from tdrl.data import BucketBatchSampler, DistillDataset, batch_statistics, collate
from tdrl.errors import ConfigError
from tdrl.evaluation import EvalConfig, evaluate
from tdrl.integrity import DirectoryLock, write_json_atomic
from tdrl.models import Teacher, model_fingerprint
from tdrl.records import record_tensors
from tdrl.training.args import TrainConfig
from tdrl.training.callbacks import TensorBoardCallback, TrainerCallback
from tdrl.training.checkpoints import RUN_FILE, claim_run_directory, export_model, load_checkpoint, save_checkpoint
from tdrl.training.online import PretrainText, collect_episodes
from tdrl.training.signals import StopSignal

__all__ = ["Trainer"]

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def _accelerator(args: TrainConfig):
    """One Accelerator per run; a single process may switch mixed precision between runs."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("num_processes", 1) == 1 and str(state.get("_mixed_precision")) != args.mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=torch.device(args.device).type == "cpu", mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )  # fmt: skip


class Trainer:
    """Train one agent with one seed.

    Args:
        agent: the agent (its student inside), on ``args.device``.
        teacher: the teacher (references, evaluation, online episodes, J_PT; not trained).
        train_dataset: a :class:`~tdrl.data.DistillDataset` (the annotation cache).
        eval_records: validation records (:func:`~tdrl.evaluation.reference_records`): model selection.
        args: the run's :class:`~tdrl.training.args.TrainConfig`.
        test_records: scored at the end, last and best-validation model (None: no test evaluation).
        callbacks: :class:`~tdrl.training.callbacks.TrainerCallback` s (main process); TensorBoard always.
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

        args = args.with_agent_defaults(type(agent).trainer_defaults)
        self.args, self.config = args, args
        self.agent, self.student, self.teacher = agent, agent.student, teacher
        self.dataset, self.eval_records, self.test_records = train_dataset, eval_records, test_records
        self.out = Path(args.out)
        self.accelerator = _accelerator(args)
        self.progress = progress and self.accelerator.is_main_process
        self.callbacks = [TensorBoardCallback(), *(callbacks or [])]
        self.eval_config = EvalConfig(
            max_new_tokens=args.eval_max_new_tokens, seeds=args.seed_list(), top_p=args.eval_top_p,
            temperature=args.eval_temperature, greedy=args.eval_greedy, also_greedy=args.eval_also_greedy,
        )  # fmt: skip
        self.test_seeds = args.test_seed_list()  # the test's sampling seeds (start rows shift them)
        self.sampler = BucketBatchSampler(train_dataset.lengths, args.batch_size, seed=args.seed)
        loader = DataLoader(train_dataset, batch_sampler=self.sampler, collate_fn=list)
        optimizer = torch.optim.AdamW(
            agent.param_groups(args.lr), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.weight_decay,
        )  # fmt: skip
        self.model, self.optimizer, self.loader = self.accelerator.prepare(
            agent, optimizer, loader, device_placement=[True, True, False]
        )
        self.scheduler = get_scheduler(SCHEDULES[args.schedule], optimizer, num_warmup_steps=args.warmup_steps,
                                       num_training_steps=args.steps)  # fmt: skip
        self.pretrain = (
            PretrainText(teacher, args.lm_corpus, args.lm_seq_len, args.lm_batch_size, args.annotation_top_k, args.seed)
            if args.lm_coef > 0 else None
        )  # fmt: skip
        self.step, self.epoch, self.consumed = 0, 0, 0  # optimiser steps; position in the data order
        self.online: list[dict] = []  # the latest student episodes (records), when online_every > 0
        self._prompts: list[str] | None = None  # prompts of online episodes (first 512 distinct training prompts)
        self.history: list[dict] = []
        self.best: dict | None = None
        self.train_time = 0.0  # seconds spent in training steps and collection (not eval, not checkpoints)
        self.resumed = False  # set by resume(): continue the run in out instead of refusing it

    # ------------------------------------------------------------------ data
    def _batches(self):
        """Micro-batches of the seeded order, epoch after epoch; a resumed run skips what it consumed."""
        while True:
            self.loader.set_epoch(self.epoch)  # accelerate's loader re-sets the sampler's epoch from its own
            self.sampler.set_epoch(self.epoch)
            skip = self.consumed
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for items in loader:
                self.consumed += 1
                yield items
            self.epoch, self.consumed = self.epoch + 1, 0

    def _collate(self, items: list[dict], micro: int) -> dict:
        """A batch of the data order, with ``online_ratio`` of it replaced by the latest student
        episodes when online (chosen by a generator seeded by the step)."""
        if self.online:
            n_online = round(self.args.online_ratio * len(items))
            rng = np.random.default_rng([self.args.seed, self.step, micro, 1])
            picks = rng.choice(len(self.online), size=n_online, replace=n_online > len(self.online))
            items = items[: len(items) - n_online] + [record_tensors(self.online[i]) for i in picks]
        return collate(items, self.teacher.pad_token_id, top_p=self.agent.config.top_p)

    @property
    def top_p(self) -> float:
        """The top-p MDP's p: the agent's re-cut (``top_p``), else the cache's own. Cached and online
        records are both re-cut at the agent's p (:func:`tdrl.records.recut`; no re-cut without one, so
        a float16 cache keeps its own sets), and online episodes are collected at this p."""
        if self.agent.config.top_p is not None:
            return self.agent.config.top_p
        return self.dataset.meta.get("settings", {}).get("top_p", self.args.annotation_top_p)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run to ``args.steps``; returns the summary (also written to ``out/summary.json``). The run
        directory is locked for the duration (a second writer gets an error) and must not hold another
        run (:func:`~tdrl.training.checkpoints.claim_run_directory`)."""
        if not self.accelerator.is_main_process:
            return self._train()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file: choose a directory")
        with DirectoryLock(self.out, "run directory"):
            claim_run_directory(self.out, resumed=self.resumed, overwrite=self.args.overwrite)
            return self._train()

    def _train(self) -> dict:
        args, main = self.args, self.accelerator.is_main_process
        callbacks = self.callbacks if main else []
        for callback in callbacks:
            callback.on_train_begin(self)
        batches = self._batches()
        started = time.perf_counter()
        window_tokens, window_start, interrupted = 0, time.perf_counter(), False
        bar = self._bar()
        try:
            with StopSignal() as stop:
                while self.step < args.steps:
                    step_start = time.perf_counter()
                    if args.online_every and self.step % args.online_every == 0:
                        rollout_metrics = self._collect_online()
                        for callback in callbacks:
                            callback.on_log(self, rollout_metrics)
                    log = (self.step + 1) % args.log_every == 0 or self.step + 1 == args.steps
                    metrics, tokens = self._train_step(batches, log)
                    self.train_time += time.perf_counter() - step_start
                    self.step += 1
                    window_tokens += tokens
                    if bar is not None:
                        bar.update(1)
                    for callback in callbacks:
                        callback.on_step_end(self)
                    if log:
                        metrics = {k: float(v) for k, v in metrics.items()}  # the one device sync per log step
                        metrics["perf/tokens_per_s"] = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                        for callback in callbacks:
                            callback.on_log(self, metrics)
                        window_tokens, window_start = 0, time.perf_counter()
                    if (args.eval_every and self.step % args.eval_every == 0) or self.step == args.steps:
                        self._evaluate(callbacks)
                    if self.step % args.checkpoint_every == 0 or self.step == args.steps or stop.raised:
                        self.save_checkpoint()
                    if stop.raised:
                        interrupted = True
                        break
        finally:
            if bar is not None:
                bar.close()
        summary = self._summary(time.perf_counter() - started, interrupted)
        if self.accelerator.num_processes > 1:  # every rank must end with the same weights
            from accelerate.utils import gather_object

            summary["rank_fingerprints"] = gather_object([model_fingerprint(self.agent)])
        if main:
            if not interrupted:
                summary.update(self.probe())
                if self.test_records:
                    summary["test"] = self.test()
            for callback in callbacks:
                callback.on_train_end(self, summary)
            write_json_atomic(self.out / "summary.json", summary)
        if interrupted:
            raise KeyboardInterrupt(f"interrupted at step {self.step}; resume with --resume {self.out}")
        return summary

    def _bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.args.steps, initial=self.step, desc=f"{self.args.agent} seed {self.args.seed}",
                    unit="step", leave=False)  # fmt: skip

    def _train_step(self, batches, log: bool) -> tuple[dict[str, torch.Tensor], int]:
        """One optimiser step over ``grad_accum`` micro-batches inside ``accelerator.accumulate`` (the
        gradients are all-reduced only on the micro-batch that steps). Metrics stay tensors (no device
        sync) and are gathered on ``log`` steps only, where the last micro-batch adds the diagnostics."""
        args = self.args
        self.agent.train()
        totals: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(args.grad_accum):
            batch = self._collate(next(batches), micro)
            index = self.step * args.grad_accum + micro  # J_PT's chunks: drawn by the micro-batch counter
            auxiliary = [self.pretrain.term(index, args.lm_coef)] if self.pretrain else []
            with self.accelerator.accumulate(self.model):
                loss, metrics = self.model(batch, diagnostics=log and micro == args.grad_accum - 1, auxiliary=auxiliary)
                _check_metric_names(metrics)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        params = [p for p in self.agent.parameters() if p.requires_grad]
                        totals["train/grad_norm"] = self.accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    totals["train/lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if log:  # the caller reads the metrics on log steps only
                stats = {f"batch/{k}": v for k, v in batch_statistics(batch).items()}
                for key, value in {"train/loss": loss.detach(), **metrics, **stats}.items():
                    value = torch.as_tensor(value, dtype=torch.float32).detach()
                    totals[key] = totals.get(key, 0.0) + value / args.grad_accum
            tokens += int(batch["response_mask"].sum())
        self.scheduler.step()
        self.agent.after_update()
        return totals, tokens

    def _collect_online(self) -> dict[str, float]:
        """Student episodes replace the online buffer (prompts: the first 512 distinct training prompts)."""
        args = self.args
        if self._prompts is None:
            self._prompts = list(dict.fromkeys(self.dataset.data["prompt"]))[:512]
        self.online, metrics = collect_episodes(
            self.agent, self.teacher, self._prompts, num_envs=args.online_envs, episodes=args.online_episodes,
            max_new_tokens=args.online_max_new_tokens, top_p=self.top_p,
            top_k=self.dataset.meta.get("settings", {}).get("top_k", args.annotation_top_k),  # the cache's K
            seed=args.seed * 1_000_003 + self.step,
        )  # fmt: skip
        return metrics

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, callbacks) -> None:
        """Validation (main process), history, and best-model selection on ``metric_for_best_model``;
        every process takes part in exporting a new best (its weights are gathered whole)."""
        from accelerate.utils import broadcast_object_list

        improved = [False]
        if self.accelerator.is_main_process:
            metrics, samples = evaluate(
                self.student.model, self.student.tokenizer, self.teacher, self.eval_records, self.eval_config,
                decode_temperature=self.agent.decode_temperature,
            )  # fmt: skip
            for callback in callbacks:
                callback.on_evaluate(self, metrics, samples)
            self.history.append({"step": self.step, "train_time_s": self.train_time, "metrics": metrics})
            key, sign = self.args.metric_for_best_model, 1.0 if self.args.greater_is_better else -1.0
            if key not in metrics:
                raise ConfigError(f"metric_for_best_model {key!r} is not an evaluation metric: {sorted(metrics)}")
            if self.best is None or sign * metrics[key] > sign * self.best["metrics"][key]:
                self.best = {"step": self.step, "metrics": metrics}
                improved = [True]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(improved)
        if improved[0]:
            state = self.accelerator.get_state_dict(self.model)
            if self.accelerator.is_main_process:
                metrics = {"step": self.step, "metrics": self.best["metrics"]}
                export_model(
                    self.student, state, self.out / "best", {"metrics.json": metrics, RUN_FILE: self._run_info()}
                )

    def test(self, greedy: bool = True) -> dict:
        """The last and the best-validation model on the test records (sampled with the evaluation
        settings, plus one greedy pass unless ``greedy`` is False): ``{"last", "best", "best_step"}``.
        This, not the validation score that selected the best model, is what a comparison reports."""
        from transformers import AutoModelForCausalLM

        config = dataclasses.replace(self.eval_config, seeds=self.test_seeds, also_greedy=greedy)

        def run(model):
            return evaluate(model, self.student.tokenizer, self.teacher, self.test_records, config,
                            decode_temperature=self.agent.decode_temperature)[0]  # fmt: skip

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

    # ------------------------------------------------------------------ records
    def _run_info(self) -> dict:
        """What an exported student came from (:data:`~tdrl.training.checkpoints.RUN_FILE`)."""
        return {"teacher": self.args.teacher, "teacher_dtype": self.args.teacher_dtype, "agent": self.args.agent,
                "decode_temperature": self.agent.decode_temperature, "step": self.step}  # fmt: skip

    def _summary(self, wall_time: float, interrupted: bool) -> dict:
        return {
            "agent": self.args.agent, "seed": self.args.seed, "steps": self.step, "interrupted": interrupted,
            "wall_time_s": wall_time, "train_time_s": self.train_time,
            "last": self.history[-1] if self.history else None, "best": self.best, "history": self.history,
            "config": self.args.to_dict(),
        }  # fmt: skip

    def hparams(self) -> dict:
        """The run's settings for TensorBoard's HParams tab: the main flags and every agent setting."""
        keep = ("agent", "student", "teacher", "seed", "steps", "batch_size", "lr", "annotation_top_k",
                "annotation_top_p", "mixed_precision", "lm_coef", "online_every", "online_ratio")  # fmt: skip
        values = {k: v for k, v in self.args.to_dict().items() if k in keep}
        values.update({f"agent.{k}": v for k, v in dataclasses.asdict(self.agent.config).items()})
        return values

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        """The trainer's own state, saved as JSON beside accelerate's (data position, history, fingerprints)."""
        return {
            "step": self.step, "epoch": self.epoch, "consumed": self.consumed, "history": self.history,
            "best": self.best, "online": self.online, "train_time_s": self.train_time,
            "data_fingerprint": self.dataset.meta.get("fingerprint"),
            "teacher_weights": self.teacher.weights_fingerprint(),
        }  # fmt: skip

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically and keep the newest ``keep_last``
        (:func:`tdrl.training.checkpoints.save_checkpoint`)."""
        return save_checkpoint(self)

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore a verified checkpoint (:func:`tdrl.training.checkpoints.load_checkpoint`)."""
        state = load_checkpoint(self, checkpoint)
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.history, self.best, self.online = state["history"], state["best"], state.get("online", [])
        self.train_time = state.get("train_time_s", 0.0)
        self.resumed = True


def _check_metric_names(metrics: dict) -> None:
    """Agent metrics and trainer metrics never share a key: the trainer's groups are reserved."""
    for key in metrics:
        if key.startswith(TRAINER_METRIC_GROUPS):
            raise ConfigError(
                f"agent metric {key!r} uses a group the trainer logs itself ({', '.join(TRAINER_METRIC_GROUPS)}): "
                "rename it"
            )
