"""End to end on the tiny models: train every agent from the CLI, eval, compare, resume, signals,
TensorBoard tags, and one-line errors for bad configurations."""

import csv
import json
import math
import os
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tdrl.cli import main
from tdrl.training import TrainConfig, TrainerCallback, build_trainer, resume_trainer
from tdrl.training.checkpoints import find_checkpoint

TINY = [
    "--teacher",
    "tiny",
    "--student",
    "tiny",
    "--data",
    "bundled",
    "--train-prompts",
    "24",
    "--response-tokens",
    "8",
    "--batch-size",
    "4",
    "--eval-prompts",
    "4",
    "--eval-max-new-tokens",
    "8",
]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(
        teacher="tiny",
        student="tiny",
        data="bundled",
        train_prompts=24,
        response_tokens=8,
        batch_size=4,
        eval_prompts=4,
        eval_max_new_tokens=8,
        steps=6,
        eval_every=3,
        checkpoint_every=3,
        log_every=1,
        out=str(out),
        lr=1e-3,
        agent="sql",
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("agent", ["bc", "sql", "cql", "iql", "iqlearn", "bd", "kd-online"])
def test_train_each_agent_from_the_cli(agent, tmp_path, capsys):
    out = tmp_path / agent
    assert main(["train", "--agent", agent, "--steps", "3", "--eval-every", "0", "--out", str(out), *TINY]) == 0
    assert "eval/rougeL" in capsys.readouterr().out
    assert (out / "summary.json").is_file() and (out / "best" / "model.safetensors").is_file()
    assert find_checkpoint(out).name == "step-0000003"


def test_eval_command_on_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--agent", "bc", "--steps", "2", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--prompts", "3", "--max-new-tokens", "6", "--seeds", "0", "1"]) == 0
    text = capsys.readouterr().out
    assert "eval/rougeL" in text and "eval/coverage" in text and "±" in text
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "best"),
                "--teacher",
                "tiny",
                "--prompts",
                "2",
                "--max-new-tokens",
                "4",
                "--seeds",
                "0",
            ]
        )
        == 0
    )


def test_compare_two_agents_two_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--agents",
                "kd,bd",
                "--seeds",
                "2",
                "--steps",
                "2",
                "--eval-every",
                "1",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| start | 2 |" in text and "| kd | 2 |" in text and "| bd | 2 |" in text
    rows = list(csv.DictReader((out / "results.csv").open()))
    pairs = [(r["agent"], r["seed"]) for r in rows]
    # the start is one model sampled once per seed (its spread is the sampling noise), probed once
    assert pairs == [("start", "0"), ("start", "1"), ("kd", "0"), ("kd", "1"), ("bd", "0"), ("bd", "1")]
    probe = "outside mass, train states"  # probed once; the test-state columns vary with the sampling seeds
    assert rows[0][probe] == rows[1][probe] and rows[0]["steps"] == rows[1]["steps"] == "0"
    assert rows[0]["greedy Rouge-L"] == rows[1]["greedy Rouge-L"] != "nan"  # one greedy pass serves both
    assert all(0 <= float(r["outside mass"]) <= 1 and float(r["Rouge-L last"]) >= 0 for r in rows)
    assert (out / "eval_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["bd-seed0", "bd-seed1", "kd-seed0", "kd-seed1"]


class InterruptAt(TrainerCallback):
    """Sends the process SIGINT after a given step, like a Ctrl-C."""

    def __init__(self, step: int = 3):
        self.at = step

    def on_step_end(self, args, state) -> None:
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("agent", ["sql", "iql"])  # with Polyak target networks and extra heads
def test_interrupt_then_resume_is_bit_for_bit(agent, tmp_path):
    full = build_trainer(tiny_config(tmp_path / "full", agent=agent), progress=False)
    full.train()
    broken = build_trainer(tiny_config(tmp_path / "broken", agent=agent), callbacks=[InterruptAt(3)], progress=False)
    with pytest.raises(KeyboardInterrupt, match="resume"):
        broken.train()
    checkpoint = find_checkpoint(tmp_path / "broken")
    assert checkpoint.name == "step-0000003"  # the SIGINT checkpoint is complete and loadable
    from tdrl.models import load_student

    assert load_student(str(checkpoint / "student")).vocab_size == 512
    resumed = resume_trainer(tmp_path / "broken", progress=False)
    assert resumed.step == 3
    resumed.train()
    a, b = full.agent.state_dict(), resumed.agent.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [(h.step, h.metrics) for h in full.state.history] == [(h.step, h.metrics) for h in resumed.state.history]
    assert [h.step for h in resumed.state.history] == [0, 3, 6]  # the starting student, then every 3 steps
    times = [h.train_time_s for h in resumed.state.history]
    assert 0 == times[0] < times[1] < times[2]  # training time excluding evaluation, carried across the resume


def test_tensorboard_events_have_the_documented_tags(tmp_path):
    trainer = build_trainer(tiny_config(tmp_path / "tb", agent="cql"), progress=False)
    summary = trainer.train()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "loss/q",
        "loss/cql",
        "cql/gap",
        "q/mean",
        "eval/rougeL",
        "eval/teacher_nll",
        "eval/coverage",
        "eval/length",
        "batch/support_size",
        "batch/support_mass",
        "batch/off_support_frac",
        "data/off_support_frac",
        "loss/support",
        "policy/outside_mass",
        "policy/entropy",
        "perf/tokens_per_s",
    }
    assert expected <= tags, expected - tags
    rouge = acc.Scalars("eval/rougeL")
    assert [e.step for e in rouge] == [0, 3, 6]  # the starting student, then every eval_every steps
    assert rouge[-1].value == pytest.approx(summary.last.metrics["eval/rougeL"], rel=1e-5)
    assert len(acc.Scalars("train/loss")) == 6
    assert "samples/text_summary" in acc.Tags()["tensors"]
    sizes = [e.value for e in acc.Scalars("batch/support_size")]
    assert all(1 <= s <= 64 for s in sizes)
    outside = [e.value for e in acc.Scalars("policy/outside_mass")]
    assert len(outside) == len(sizes) and all(0 < m < 1 for m in outside)  # every log step, a probability


def test_checkpoints_keep_last_k(tmp_path):
    config = tiny_config(tmp_path / "k").replace(steps=4, checkpoint_every=1, eval_every=0, keep_last=2)
    build_trainer(config, progress=False).train()
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


def make_other_vocab_student(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(50)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1", unk_token="w0")
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--agent", "ppo"], "unknown agent 'ppo'"),
        (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["--data", "/no/such/annotation"], "does not exist"),
        (["--agent-args", "alpha"], "not key=value"),
        (["--agent", "sql", "--agent-args", "temperature=2"], "no setting"),
        (["--student", "OTHER"], "different vocabularies"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(argv, message, tmp_path, capsys):
    make_other_vocab_student(tmp_path / "other")
    argv = [str(tmp_path / "other") if a == "OTHER" else a for a in argv]
    base = [a for a in TINY]
    assert main(["train", *base, "--steps", "1", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_resume_and_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_yaml_config_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("agent: iqlearn\nagent_args: {chi2: false}\nsteps: 2\neval_every: 0\n")
    out = tmp_path / "y"
    assert main(["train", "--config", str(cfg), "--steps", "1", "--out", str(out), *TINY]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["agent"] == "iqlearn" and summary["steps"] == 1
    assert summary["config"]["agent_config"]["chi2"] is False
    (tmp_path / "bad.yaml").write_text("agnet: bd\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), *TINY]) == 2
    assert "unknown setting(s) agnet" in capsys.readouterr().err


def test_tensorboard_command_serves_on_localhost(monkeypatch, tmp_path, capsys):
    import subprocess

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    assert main(["tensorboard", str(tmp_path), "--port", "6123"]) == 0
    assert "http://127.0.0.1:6123/" in capsys.readouterr().out
    cmd = seen["cmd"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--logdir") + 1] == str(tmp_path)


@pytest.mark.slow
def test_two_processes_with_gloo_end_with_identical_weights(tmp_path):
    """torchrun starts 2 CPU ranks (gloo); each trains on its half of every batch, DDP averages the
    gradients, and both ranks must end with the same weights."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "tdrl.cli",
        "train",
        "--agent",
        "sql",
        "--steps",
        "3",
        "--eval-every",
        "0",
        "--out",
        str(out),
        *TINY,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-2000:]
    fingerprints = json.loads((out / "summary.json").read_text())["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]


def _torchrun(*args: str) -> None:
    """``tdrl train ARGS`` on 2 CPU ranks (torchrun, gloo), on a free port."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command = [*launch, "--master_port", str(port), "-m", "tdrl.cli", "train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_matches_ddp_exports_whole_weights_and_resumes_bit_for_bit(tmp_path):
    """--fsdp on 2 CPU ranks (FSDP2, gloo): the losses and weights are DDP's to float32 rounding (the
    gradient reductions add in another order; measured 1e-8), best/ and the checkpoints hold the whole
    weights (and whole AdamW state, weights_only-loadable), and a run resumed from its step-2 checkpoint
    (as after a crash there) ends with the uninterrupted run's weights bit for bit."""
    import json
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = ["--agent", "sql", "--steps", "4", "--eval-every", "0", "--checkpoint-every", "2", "--log-every", "1"]
    fsdp, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    _torchrun(*run, "--out", str(fsdp), "--fsdp", *TINY)
    _torchrun(*run, "--out", str(ddp), *TINY)
    last = "checkpoints/step-0000004/model.safetensors"
    whole, reference = load_file(fsdp / last), load_file(ddp / last)
    assert whole.keys() == reference.keys()
    for key, value in reference.items():
        assert whole[key].shape == value.shape and torch.allclose(whole[key], value, rtol=0, atol=1e-6), key
    losses = {}
    for name in ("fsdp", "ddp"):
        acc = EventAccumulator(str(tmp_path / name))
        acc.Reload()
        losses[name] = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses["fsdp"]) == 4 and losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5, abs=1e-6)
    fingerprints = json.loads((fsdp / "summary.json").read_text())["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    # best/ is an ordinary HF model with the whole weights
    model = AutoModelForCausalLM.from_pretrained(str(fsdp / "best"), dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, whole[f"student.model.{key}"]), key
    optimizer = torch.load(fsdp / "checkpoints/step-0000004/optimizer.bin", weights_only=True)
    assert (
        optimizer["state"]["student.model.transformer.wte.weight"]["exp_avg"].shape
        == model.transformer.wte.weight.shape
    )
    # a crash after step 2: the run is resumed from its step-2 checkpoint
    shutil.copytree(fsdp, resumed)
    for name in ("checkpoints/step-0000004", "best"):
        shutil.rmtree(resumed / name)
    (resumed / "summary.json").unlink()
    _torchrun("--resume", str(resumed))
    again = load_file(resumed / last)
    assert all(torch.equal(again[key], value) for key, value in whole.items())
    best = load_file(resumed / "best/model.safetensors")
    assert all(torch.equal(best[key], value) for key, value in load_file(fsdp / "best/model.safetensors").items())


def test_online_student_episodes_are_mixed_in_and_resume_exactly(tmp_path):
    kw = dict(agent="bc", online_every=2, online_ratio=0.5, online_episodes=4, online_envs=2, online_max_new_tokens=5)
    full = build_trainer(tiny_config(tmp_path / "full", **kw), progress=False)
    full.train()
    online = full.state.online
    assert len(online) == 4 and all(len(r["response_ids"]) <= 5 for r in online)
    acc = EventAccumulator(str(tmp_path / "full"))
    acc.Reload()
    assert {"rollout/return", "rollout/coverage", "rollout/length", "rollout/off_support_rate"} <= set(
        acc.Tags()["scalars"]
    )
    assert [e.step for e in acc.Scalars("rollout/return")] == [0, 2, 4]
    broken = build_trainer(tiny_config(tmp_path / "broken", **kw), callbacks=[InterruptAt(3)], progress=False)
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    resumed = resume_trainer(tmp_path / "broken", progress=False)
    resumed.train()
    for key, value in full.agent.state_dict().items():
        assert torch.equal(value, resumed.agent.state_dict()[key]), key


def test_auxiliary_lm_loss_on_the_pydoc_corpus(tmp_path):
    from tdrl.testing import tiny_tokenizer
    from tdrl.training.online import lm_chunks

    chunks = lm_chunks(tiny_tokenizer(), "pydoc", 32)
    assert chunks.shape[1] == 32 and chunks.shape[0] > 100
    trainer = build_trainer(
        tiny_config(tmp_path / "lm", agent="bc", lm_coef=0.5, steps=2, eval_every=0), progress=False
    )
    trainer.train()
    acc = EventAccumulator(str(tmp_path / "lm"))
    acc.Reload()
    nll, kd, lm = (acc.Scalars(f"loss/lm{s}")[0].value for s in ("_nll", "_kd", ""))
    assert lm == pytest.approx(0.5 * nll + 0.5 * kd, rel=1e-5)
    bc = acc.Scalars("loss/bc")[0].value
    assert acc.Scalars("train/loss")[0].value == pytest.approx(bc + 0.5 * lm, rel=1e-5)


def test_pretrain_text_term_is_j_pt_as_an_auxiliary_term(tiny_teacher):
    """PretrainText.term(index, coef): micro-batch ``index``'s chunks (those of ``batch(index)``), named
    ``lm``, whose value is pretrain_loss: forward adds coef times it and logs loss/lm, loss/lm_nll and
    loss/lm_kd as before the term existed."""
    from tdrl.agents import make_agent
    from tdrl.agents.ops import pretrain_loss
    from tdrl.models import load_student
    from tdrl.testing.agent_contract import contract_batch
    from tdrl.training.online import PretrainText

    text = PretrainText(tiny_teacher, "pydoc", 16, 2, 8, seed=0)
    term, drawn = text.term(3, 0.5), text.batch(3)
    assert (term.name, term.coef) == ("lm", 0.5)
    assert set(term.inputs) == set(drawn) and all(torch.equal(term.inputs[k], drawn[k]) for k in drawn)
    assert not torch.equal(text.term(4, 0.5).inputs["input_ids"], drawn["input_ids"])  # the index picks the chunks
    torch.manual_seed(0)
    student = load_student("tiny")
    agent, batch = make_agent("bc", student), contract_batch()
    base, _ = agent(batch)
    loss, metrics = agent(batch, auxiliary=[term])
    lm, expected = pretrain_loss(student, *(drawn[k] for k in ("input_ids", "cand_ids", "cand_probs")), chunk=4096)
    assert loss.item() == pytest.approx(base.item() + 0.5 * lm.item(), rel=1e-5)
    assert set(expected) == {"loss/lm", "loss/lm_nll", "loss/lm_kd"}
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(float(value), rel=1e-5), key


def test_demo_command_plumbing_with_tiny_overrides(tmp_path, capsys):
    """`tdrl demo` = a cached warm start, then compare from it with the demo budget; later flags
    override the budget (tiny models here). The table is on test prompts with the warm start as a row."""
    out = tmp_path / "demo"
    flags = "--agents kd,bd --seeds 2 --steps 1 --eval-every 0 --warm-start-steps 2 --test-prompts 2".split()
    argv = ["demo", *flags, *TINY, "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| warm start | 2 |" in text and "| kd | 2 |" in text and "| bd | 2 |" in text
    assert "demo wall time" in text and "Beyond the seed spread" in text and "tdrl tensorboard" in text
    assert (out / "results.md").is_file() and (out / "warm-start" / "tdrl-warm-start.json").is_file()
    marker = (out / "warm-start" / "tdrl-warm-start.json").stat().st_mtime_ns
    assert main(argv) == 0  # the second demo reuses the warm start
    assert (out / "warm-start" / "tdrl-warm-start.json").stat().st_mtime_ns == marker


def test_warm_start_command_is_cached_by_its_settings(tmp_path, capsys):
    out = tmp_path / "warm"
    argv = ["warm-start", *TINY, "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "tdrl-warm-start.json").read_text())
    assert record["steps"] == 2 and record["settings"]["agent"] == "bc:mode=kd"
    assert (out / "model.safetensors").is_file() and (out / "run").is_dir()
    assert not list(tmp_path.glob(".warm.partial-*"))  # nothing left half-done
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    capsys.readouterr()
    assert main([*argv, "--lr", "0.5"]) == 2
    assert "other settings (lr differ)" in capsys.readouterr().err
    assert main([*argv, "--lr", "0.5", "--overwrite"]) == 0
    assert json.loads((out / "tdrl-warm-start.json").read_text())["settings"]["lr"] == 0.5
    run = tmp_path / "from-warm"
    student_args = [a if a != "tiny" or i != TINY.index("--student") + 1 else str(out) for i, a in enumerate(TINY)]
    assert main(["train", "--agent", "bd", "--steps", "1", "--out", str(run), *student_args]) == 0
    assert json.loads((run / "summary.json").read_text())["config"]["student"] == str(out)


def test_eval_on_the_users_own_data_with_references(tmp_path, capsys):
    """`tdrl eval --data my.jsonl`: Rouge-L against the human references and against the run's own
    teacher's greedy answers, NLL and coverage; the test split of a run is reported in its summary."""
    out = tmp_path / "run"
    assert main(["train", "--agent", "bc", "--steps", "2", "--test-prompts", "2", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"last", "best", "best_step"} <= set(summary["test"])
    assert "eval/rougeL_greedy" in summary["test"]["last"] and 0 <= summary["probe"]["outside_mass"] <= 1
    data = tmp_path / "my.jsonl"
    pairs = [
        ("What is the capital of France?", "Paris is the capital of France."),
        ("Name three colors.", "Red, green and blue."),
        ("Say hi.", "Hi!"),
    ]
    rows = [{"prompt": prompt, "reference": reference} for prompt, reference in pairs]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    capsys.readouterr()
    assert (
        main(["eval", "--checkpoint", str(out / "best"), "--data", str(data), "--seeds", "0", "--max-new-tokens", "5"])
        == 0
    )
    text = capsys.readouterr().out
    assert "eval/rougeL_reference" in text and "eval/rougeL " in text and "eval/coverage" in text
    assert "teacher tiny" in text and "on 3 " in text  # the run's own teacher, every prompt of the file


def test_references_are_cached_by_the_teachers_weights_not_its_name(tmp_path, monkeypatch):
    from tdrl.evaluation import reference_records
    from tdrl.models import Teacher
    from tdrl.testing import tiny_teacher

    monkeypatch.setenv("TDRL_CACHE", str(tmp_path / "cache"))
    a, b = tiny_teacher(seed=0), tiny_teacher(seed=1)
    a, b = (Teacher(t.model, t.tokenizer, name="same-name") for t in (a, b))
    ra = reference_records(a, "bundled", n=4, max_new_tokens=6)
    rb = reference_records(b, "bundled", n=4, max_new_tokens=6)
    assert len(list((tmp_path / "cache" / "data").glob("references-*.json"))) == 2
    assert [r["reference_response"] for r in ra] != [r["reference_response"] for r in rb]
    assert reference_records(a, "bundled", n=4, max_new_tokens=6) == ra  # read back from the cache
    assert all("answer" in r and "human_reference" not in r for r in ra)  # bundled: short answers only


# ------------------------------------------------------------------ arguments, mixed precision, selection
def test_train_help_lists_the_chosen_agents_typed_flags(capsys):
    assert main(["train", "--agent", "bd", "--help"]) == 0
    text = capsys.readouterr().out
    assert "agent settings (BDConfig)" in text
    for flag in ("--expert-term", "--chi2", "--alpha", "--q-min", "--max-over", "--support-coef"):
        assert flag in text, flag
    assert "topp_mean (the" in text  # with the field's help
    for flag in ("--annotation-top-p", "--eval-top-p", "--mixed-precision", "--metric-for-best-model"):
        assert flag in text, flag
    assert main(["train", "--agent", "sql", "--help"]) == 0
    text = capsys.readouterr().out
    assert "agent settings (SQLConfig)" in text and "--expert-term" not in text and "--tau" in text
    assert main(["train", "--help"]) == 0  # the default agent's settings: what `tdrl train --alpha 0.2` parses
    assert "agent settings (BDConfig)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        "teacher-info",
        "generate-responses",
        "annotate",
        "agents",
        "train",
        "eval",
        "warm-start",
        "compare",
        "tensorboard",
        "demo",
    ],
)
def test_every_subcommand_help_exits_0_from_the_parser_that_parses(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: tdrl {command}")
    if command in ("train", "warm-start", "compare", "demo"):  # every config leaf, with its default
        assert "--eval-every EVAL_EVERY" in text and "--lr LR" in text
    if command == "warm-start":  # its presets are the defaults it shows (the recipe's)
        assert "(default: constant)" in text and "--overwrite, --no-overwrite" in text


def hparams_of(run_dir) -> dict:
    """The hparams TensorBoard's HParams tab shows for a run, read back from its event files."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def test_typed_agent_flags_reach_the_agent_the_summary_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "typed"
    flags = "--agent iqlearn --expert-term topp_mean --no-chi2 --alpha 0.25 --steps 1 --eval-every 0".split()
    argv = ["train", *flags, "--out", str(out), *TINY]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["config"]["agent_config"]
    assert (settings["alpha"], settings["chi2"], settings["expert_term"]) == (0.25, False, "topp_mean")
    hp = hparams_of(out)
    assert hp["agent.expert_term"] == "topp_mean" and hp["agent.alpha"] == 0.25
    assert hp["agent.chi2"] == 0  # torch writes bools as numbers
    assert hp["agent.gamma"] == 0.99 and hp["agent"] == "iqlearn"  # every agent field, set or not
    capsys.readouterr()
    twice = [
        "train",
        "--agent",
        "iqlearn",
        "--alpha",
        "0.2",
        "--agent-args",
        "alpha=0.3",
        *TINY,
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(twice) == 2
    assert "alpha given twice" in capsys.readouterr().err
    assert main(["train", "--agent", "iqlearn", "--alpha", "lots", *TINY, "--out", str(tmp_path / "u")]) == 2
    assert "--alpha" in capsys.readouterr().err  # type-checked like every flag


def test_yaml_takes_agent_fields_at_the_top_level(tmp_path):
    from tdrl.training.args import parse_train_args

    (tmp_path / "run.yaml").write_text("agent: bd\nexpert_term: token\nq_min: -5\nsteps: 7\n")
    config, rest = parse_train_args(["--config", str(tmp_path / "run.yaml"), "--q-min", "-3"])
    assert rest == [] and config.optim.steps == 7
    assert (config.agent_config.expert_term, config.agent_config.q_min) == ("token", -3.0)  # the flag wins


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, capsys):
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        flags = f"--agent bc --steps 2 --eval-every 0 --log-every 1 --lr 0 --mixed-precision {precision}".split()
        argv = ["train", *flags, "--out", str(out), *TINY]
        assert main(argv) == 0
        acc = EventAccumulator(str(out))
        acc.Reload()
        losses[precision] = [e.value for e in acc.Scalars("train/loss")]
    assert all(math.isfinite(v) for v in losses["bf16"])
    # lr 0: the same weights and batches; bf16 autocast changes the arithmetic, not the result's scale
    assert losses["bf16"] != losses["no"] and losses["bf16"] == pytest.approx(losses["no"], rel=0.05)
    capsys.readouterr()
    assert main(["train", "--mixed-precision", "fp16", *TINY, "--out", str(tmp_path / "fp16")]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_best_model_on_a_chosen_metric_and_direction(tmp_path):
    selection = dict(metric_for_best_model="eval/teacher_nll", greater_is_better=False)
    config = tiny_config(tmp_path / "nll", agent="bc", steps=4, eval_every=1, lr=5e-3, **selection)
    trainer = build_trainer(config, progress=False)
    trainer.train()
    nll = {h.step: h.metrics["eval/teacher_nll"] for h in trainer.state.history}
    assert trainer.state.best.step == min(nll, key=nll.get)
    exported = json.loads((tmp_path / "nll" / "best" / "metrics.json").read_text())
    assert exported["step"] == trainer.state.best.step
    with pytest.raises(Exception, match="must be an eval"):
        tiny_config(tmp_path / "x", metric_for_best_model="train/loss")


def test_warm_up_runs_its_full_length_and_accumulation_steps_once_per_group(tmp_path):
    schedule = dict(steps=4, warmup_steps=8, schedule="constant", lr=1e-3)
    config = tiny_config(tmp_path / "wu", agent="bc", eval_every=0, grad_accum=2, batch_size=2, **schedule)
    trainer = build_trainer(config, progress=False)
    trainer.train()
    acc = EventAccumulator(str(tmp_path / "wu"))
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs == pytest.approx([0.0, 1e-3 / 8, 2e-3 / 8, 3e-3 / 8])  # not capped at 10 % of the steps
    assert trainer.state.consumed == 8 and trainer.scheduler.last_epoch == 4  # 2 micro-batches per optimiser step
