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

import hashlib
import json
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
from tdrl.evaluation import EvalConfig, evaluate
from tdrl.records import record_tensors
from tdrl.students import load_student
from tdrl.teachers import Teacher, load_teacher, tdrl_cache_dir
from tdrl.tracking import Tracker, samples_markdown

__all__ = ["Trainer", "prepare_bundled_data", "eval_records", "find_checkpoint", "set_seed"]

COMPLETE = "tdrl-checkpoint.json"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data
def _data_root(teacher: Teacher, config: TrainConfig) -> Path:
    key = json.dumps([teacher.name, config.train_prompts, config.response_tokens, config.top_k, config.top_p])
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


def eval_records(teacher: Teacher, n: int, max_new_tokens: int, split: str = "validation") -> list[dict]:
    """The first ``n`` bundled ``split`` prompts with the teacher's greedy response as reference
    (cached under ``$TDRL_CACHE/data``)."""
    key = json.dumps([teacher.name, n, max_new_tokens, split])
    path = tdrl_cache_dir() / "data" / f"references-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = load_source("bundled", split=split).select(range(n)).to_list()
    responses = []
    for start in range(0, len(rows), 16):
        responses += teacher.generate([r["prompt"] for r in rows[start : start + 16]], max_new_tokens, do_sample=False)
    eos = teacher.eos_token_id
    records = [
        {"prompt": r["prompt"], "reference": r.get("reference"),
         "reference_response": teacher.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip()}
        for r, ids in zip(rows, responses)
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, records)
    return records


# ---------------------------------------------------------------------------------------------- checkpoints
def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a complete checkpoint, else the newest complete one under
    ``path/checkpoints``; :class:`~tdrl.errors.CheckpointNotFoundError` if there is none."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    candidates = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / COMPLETE).is_file())
    if not candidates:
        raise CheckpointNotFoundError(
            f"no complete checkpoint in {path}: pass a run directory written by `tdrl train` or one of its "
            "checkpoints/step-* directories"
        )
    return candidates[-1]


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
        get_agent(config.agent)  # an unknown agent fails before any model loads
        set_seed(config.seed)
        self.teacher = teacher or load_teacher(config.teacher, dtype=config.teacher_dtype, device=config.device)
        self.student = load_student(config.student, teacher=self.teacher).to(config.device)
        check_same_vocabulary(self.teacher.tokenizer, self.student.tokenizer)
        self.agent = make_agent(config.agent, self.student, **self.agent_args).to(config.device)
        if getattr(self.agent, "uses_teacher", False):  # e.g. kd-online: the teacher runs inside the loss
            self.agent.attach_teacher(self.teacher)
        if getattr(self.agent, "on_policy", False) and not config.online_every:
            # on-policy agents (minillm) learn from their own samples: collect every 10 steps, all online
            config.online_every, config.online_ratio = 10, 1.0
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
            self.eval_records = eval_records(
                self.teacher, config.eval_prompts, config.eval_max_new_tokens, split=config.eval_split
            )
        self.sampler = BucketBatchSampler(self.dataset.lengths, config.batch_size, seed=config.seed)
        self.eval_config = EvalConfig(
            max_new_tokens=config.eval_max_new_tokens, seeds=config.seed_list(), top_p=config.eval_top_p,
            temperature=config.eval_temperature, greedy=config.eval_greedy,
        )  # fmt: skip
        params = [p for p in self.agent.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(self.agent, self.optimizer)
        self.step = 0
        self.online: list[dict] = []  # the latest student episodes (records), when online_every > 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.train_time = 0.0  # seconds spent in training steps and collection (not eval, not checkpoints)
        self._batches = iter(())

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
        """Run to ``config.steps``; returns the summary (also written to ``out/summary.json``)."""
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
                    metrics, tokens = self._train_step()
                    self.train_time += time.perf_counter() - step_start
                    if main and rollout_metrics is not None:
                        tracker.scalars(rollout_metrics, self.step)
                    self.step += 1
                    window_tokens += tokens
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        elapsed = time.perf_counter() - window_start
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
                last = self.history[-1]["metrics"] if self.history else {}
                final = {**last, **{f"best_{k}": v for k, v in (self.best or {}).get("metrics", {}).items()}}
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

    def _train_step(self) -> tuple[dict[str, float], int]:
        cfg = self.config
        self.agent.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = self._next_batch()
            with self._autocast():
                loss, metrics = self.model(batch)
                if cfg.lm_coef > 0:
                    lm_loss, lm_metrics = self._lm_loss()
                    loss = loss + cfg.lm_coef * lm_loss
                    metrics.update(lm_metrics)
            self.accelerator.backward(loss / cfg.grad_accum)
            metrics = {"train/loss": loss.item(), **metrics, **_data_metrics(batch)}
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
            tokens += int(batch["response_mask"].sum())
        params = [p for p in self.agent.parameters() if p.requires_grad]
        if cfg.max_grad_norm > 0:
            totals["train/grad_norm"] = float(self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        totals["train/lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.agent.after_update()
        return totals, tokens

    def _lm_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """MiniLLM's pre-training term J_PT on a plain-text corpus: 0.5 * next-token NLL + 0.5 * KD
        (cross-entropy from the teacher's top-k renormalised to the student's full-vocabulary policy)."""
        cfg = self.config
        if not hasattr(self, "_lm_chunks"):
            self._lm_chunks = lm_chunks(self.teacher.tokenizer, cfg.lm_corpus, cfg.lm_seq_len)
        rng = np.random.default_rng([cfg.seed, self.step, 2])
        picks = rng.choice(
            len(self._lm_chunks), size=cfg.lm_batch_size, replace=len(self._lm_chunks) < cfg.lm_batch_size
        )
        ids = self._lm_chunks[torch.as_tensor(picks)].to(self.student.device)
        teacher = self.teacher.annotate(ids, top_k=cfg.top_k, top_p=1.0).subset
        logp = torch.log_softmax(self.student.full_logits(self.student.hidden_states(ids))[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
        target = torch.softmax(teacher.logprobs[:, :-1], -1)  # teacher top-k, renormalised
        kd = -(target * logp.gather(-1, teacher.ids[:, :-1])).sum(-1).mean()
        loss = 0.5 * nll + 0.5 * kd
        return loss, {"loss/lm": loss.item(), "loss/lm_nll": nll.item(), "loss/lm_kd": kd.item()}

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

    def _export(self, target: Path, metrics: dict) -> None:
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        self.student.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps({"step": self.step, "metrics": metrics}, indent=2))
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)

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
            state = {
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "history": self.history,
                "best": self.best,
                "online": self.online,
                "train_time_s": self.train_time,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
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
        """A trainer restored from the newest complete checkpoint under ``path`` (or ``path`` itself).
        ``steps`` may extend the run."""
        from safetensors.torch import load_model

        checkpoint = find_checkpoint(path)
        config = TrainConfig(**json.loads((checkpoint / "config.json").read_text()))
        if steps is not None:
            config.steps = steps
        trainer = cls(config, teacher=teacher, progress=progress)
        load_model(trainer.agent, str(checkpoint / "agent.safetensors"))
        trainer.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        trainer.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True)["torch"])
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        trainer.step, trainer.history, trainer.best = state["step"], state["history"], state["best"]
        trainer.online = state.get("online", [])
        trainer.train_time = state.get("train_time_s", 0.0)
        trainer.sampler.load_state_dict(state["sampler"])
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
    """The student as an env policy (batched observations). It samples from its decoding policy on
    R(s): A_p(s) (the top-p MDP) for ``restrict="topp"`` agents, the full vocabulary for
    ``restrict="none"`` (then it may leave A_p(s); the env flags it). With ``teacher_mix`` alpha > 0
    (MiniLLM) it samples from alpha pi_T + (1 - alpha) pi_S on A_p(s)."""

    def __init__(self, agent, seed: int = 0, temperature: float = 1.0, teacher_mix: float = 0.0):
        self.agent, self.temperature, self.teacher_mix = agent, temperature, teacher_mix
        self.generator = torch.Generator().manual_seed(seed)

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
        if self.agent.config.restrict != "topp":
            actions = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).numpy()
        else:
            cand = torch.as_tensor(np.atleast_2d(obs["cand_ids"]))
            in_set = torch.as_tensor(np.atleast_2d(obs["cand_mask"])).bool()
            on_set = probs.gather(-1, cand).masked_fill(~in_set, 0.0)
            on_set = on_set / on_set.sum(-1, keepdim=True).clamp_min(1e-30)
            if self.teacher_mix > 0:
                teacher = torch.softmax(torch.as_tensor(np.atleast_2d(obs["cand_logprobs"])).float(), -1)
                on_set = self.teacher_mix * teacher + (1 - self.teacher_mix) * on_set
            choice = torch.multinomial(on_set, 1, generator=self.generator)
            actions = cand.gather(-1, choice).squeeze(-1).numpy()
        return actions if np.ndim(obs["length"]) else actions[0]


def _data_metrics(batch: dict) -> dict[str, float]:
    sel = batch["response_mask"].bool()
    mask = batch["cand_mask"][sel]
    mass = torch.where(mask, batch["cand_logprobs"][sel].exp(), torch.zeros_like(mask, dtype=torch.float32))
    return {
        "data/support_size": mask.sum(-1).float().mean().item(),
        "data/support_mass": mass.sum(-1).mean().item(),
        "data/off_support_frac": 1.0 - batch["action_in_cand"][sel].float().mean().item(),
    }
