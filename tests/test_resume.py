"""Resuming never silently mixes two runs: a best/ exported after the checkpoint resumed from is never
tested as the best model, an older checkpoint is not resumed over newer ones unasked, the validation
and test records must be the ones the run started with, and TensorBoard shows each step once.

A SIGKILL is simulated by copying the run directory at a point in time (what a killed process leaves
on disk, with the TensorBoard events flushed: the worst case for duplicates), while the run itself goes
on to the end: the uninterrupted reference."""

import json
import logging
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginEventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from tdrl.cli import main
from tdrl.integrity import write_manifest
from tdrl.training import TrainConfig, TrainerCallback, build_trainer
from tdrl.training.checkpoints import STATE_FILE, find_checkpoint

TINY = (
    "--teacher tiny --student tiny --data bundled --train-prompts 16 --response-tokens 6 --batch-size 4 "
    "--eval-prompts 2 --eval-max-new-tokens 4 --test-prompts 0 --eval-every 0"
).split()


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))


def fails(capsys, argv, *needles) -> str:
    """``tdrl argv`` exits 2 with one line on stderr holding every needle, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tdrl:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def summary_of(run) -> dict:
    """summary.json without what depends on the clock or on the directory's name."""
    summary = json.loads((run / "summary.json").read_text())
    for key in ("wall_time_s", "train_time_s"):
        summary.pop(key)
    summary["config"].pop("out")
    for record in [*summary["history"], summary["best"], summary["last"]]:
        record.pop("train_time_s")
    return summary


class KillAt(TrainerCallback):
    """At the end of step ``at``: the run directory as a SIGKILL then would leave it, copied to ``to``."""

    def __init__(self, at: int, to):
        self.at, self.to, self.trainer = at, to, None

    def on_step_end(self, args, state) -> None:
        if state.step == self.at:
            self.trainer.callbacks[0].tracker.writer.flush()  # the TensorBoard callback's writer
            shutil.copytree(args.out, self.to)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Issue 1's run: bc, 10 steps, validation every step on eval/teacher_nll (lower is better),
    checkpoints every 5, test prompts; killed at step 9, when the only checkpoint is step 5 and best/
    was exported after it. Returns (uninterrupted run, the killed run's directory)."""
    root = tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))
        config = TrainConfig.from_dict(
            dict(
                teacher="tiny",
                student="tiny",
                data="bundled",
                train_prompts=16,
                response_tokens=6,
                batch_size=4,
                eval_prompts=2,
                eval_max_new_tokens=4,
                test_prompts=2,
                agent="bc",
                steps=10,
                eval_every=1,
                checkpoint_every=5,
                log_every=1,
                lr=1e-2,
                warmup_steps=0,
                schedule="constant",  # the first n steps of a run are those of any longer one
                metric_for_best_model="eval/teacher_nll",
                greater_is_better=False,
                out=str(root / "full"),
            )
        )
        kill = KillAt(9, root / "killed")
        kill.trainer = build_trainer(config, callbacks=[kill], progress=False)
        kill.trainer.train()
    killed = root / "killed"
    state = json.loads((killed / "checkpoints" / "step-0000005" / STATE_FILE).read_text())
    exported = json.loads((killed / "best" / "metrics.json").read_text())["step"]
    # the case: the checkpoint's best model is older than it, best/ holds a later one, and no checkpoint of
    # the checkpoint's best is kept (these hold for the tiny models on the CPU; if they moved, pick another kill)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000005"]
    assert state["best"]["step"] < 5 < exported < 9, (state["best"]["step"], exported)
    return root / "full", killed


def test_a_best_export_newer_than_the_checkpoint_is_never_tested_as_the_best_model(killed, tmp_path, capsys, caplog):
    full, dead = killed
    run = tmp_path / "run"
    shutil.copytree(dead, run)
    best_step = json.loads((run / "checkpoints" / "step-0000005" / STATE_FILE).read_text())["best"]["step"]
    # resumed to a step before the later export: the best model's weights (step best_step) are gone
    with caplog.at_level(logging.WARNING, logger="tdrl.training.resume"):
        assert main(["train", "--resume", str(run), "--steps", "5"]) == 0
    assert "holds the student of step" in caplog.text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["step"] == summary["test"]["best_step"] == best_step
    assert summary["test"]["best"] == {} and f"step {best_step}" in summary["test"]["best_unavailable"]
    assert summary["test"]["last"]  # the last model is tested as ever
    assert "not tested:" in capsys.readouterr().out
    assert not (run / "best").exists()  # the later export is gone: `tdrl eval --checkpoint RUN/best` cannot score it
    fails(capsys, ["eval", "--checkpoint", str(run / "best"), "--prompts", "2", "--seeds", "0"], "does not exist")


@pytest.fixture(scope="module")
def resumed(killed, tmp_path_factory):
    """The killed run resumed to its end (step 10) from the CLI."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(killed[1], run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))
        assert main(["train", "--resume", str(run), "--steps", "10"]) == 0
    return run


def test_a_resume_that_passes_the_export_again_ends_as_the_uninterrupted_run(killed, resumed, tmp_path):
    full, dead = killed
    assert snapshot(resumed / "best") == snapshot(full / "best")  # the best model of the run, bit for bit
    assert summary_of(resumed) == summary_of(full)  # best step and metrics, history, test of last and best
    # resumed to step 7, after the later export's step: that best model is exported again, as it was
    run = tmp_path / "run7"
    shutil.copytree(dead, run)
    assert main(["train", "--resume", str(run), "--steps", "7"]) == 0
    summary, expected = summary_of(run), summary_of(full)
    assert 5 < expected["best"]["step"] <= 7  # the uninterrupted run's best model is the later export
    assert summary["best"] == expected["best"] and summary["history"] == expected["history"][:8]
    assert (
        summary["test"]["best"] == expected["test"]["best"] and summary["test"]["best_step"] == expected["best"]["step"]
    )
    assert snapshot(run / "best") == snapshot(full / "best")


def scalars_and_texts(run) -> dict:
    """Every tag of a run directory's events, scalars and texts: tag -> [(step, value), ...], as
    TensorBoard's loader serves them (its plugin EventAccumulator: each summary as a tensor, and the
    purge of what a restarted writer's ``purge_step`` discards, texts included)."""
    acc = PluginEventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag: [(e.step, make_ndarray(e.tensor_proto).tolist()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }


def scalars(run) -> dict:
    """The scalars as the classic EventAccumulator reads them (what tests/test_training.py reads)."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_after_a_kill_and_resume_shows_each_step_once_as_uninterrupted(killed, resumed):
    full, dead = killed
    assert max(step for step, _ in scalars_and_texts(dead)["train/loss"]) > 5  # it logged past its checkpoint
    for shown, expected in ((scalars_and_texts(resumed), scalars_and_texts(full)), (scalars(resumed), scalars(full))):
        assert shown.keys() == expected.keys() and "train/loss" in shown
        assert [step for step, _ in shown["eval/teacher_nll"]] == list(range(11))
        for tag, values in shown.items():
            steps = [step for step, _ in values]
            assert len(steps) == len(set(steps)), (tag, steps)  # one value per step: the killed run's 6-8 purged
            if tag.startswith("perf/"):  # throughput: the clock's
                assert steps == [step for step, _ in expected[tag]], tag
            else:
                assert values == expected[tag], tag
    assert "samples/text_summary" in scalars_and_texts(resumed)  # the evaluation samples (text) too


def test_resuming_an_older_checkpoint_over_newer_ones_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "R"
    argv = ["train", "--agent", "bc", *TINY, "--steps", "6", "--checkpoint-every", "1", "--keep-last", "3"]
    assert main([*argv, "--out", str(run)]) == 0
    before = snapshot(run)
    older = run / "checkpoints" / "step-0000004"
    message = fails(
        capsys,
        ["train", "--resume", str(older), "--steps", "5"],
        "checkpoints/step-0000005",
        "checkpoints/step-0000006",
        "best",
        "newer than the checkpoint of step 4",
        "--overwrite",
    )
    assert "summary.json" in message
    assert snapshot(run) == before  # refused before any work: nothing written, nothing deleted
    # the newest checkpoint itself, named, is no older checkpoint: it resumes
    assert main(["train", "--resume", str(run / "checkpoints" / "step-0000006"), "--steps", "6"]) == 0
    # --overwrite with --resume: exactly tdrl's outputs newer than step 4 go, anything else in checkpoints/ stays
    (run / "checkpoints" / "NOTES.txt").write_text("mine")
    assert main(["train", "--resume", str(older), "--steps", "5", "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["NOTES.txt", "step-0000004", "step-0000005"]
    assert json.loads((run / "best" / "metrics.json").read_text())["step"] == 5
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    assert find_checkpoint(run).name == "step-0000005"  # what `tdrl eval --checkpoint R` evaluates
    assert main(["train", "--resume", str(run), "--steps", "7"]) == 0  # continues the step-5 run, not the old 6
    summary = json.loads((run / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [5, 7]
    # a newer checkpoint that is a symbolic link is never deleted through
    link_run = tmp_path / "L"
    assert (
        main(["train", "--agent", "bc", *TINY, "--steps", "3", "--checkpoint-every", "1", "--out", str(link_run)]) == 0
    )
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(link_run / "checkpoints" / "step-0000003"), elsewhere)
    (link_run / "checkpoints" / "step-0000003").symlink_to(elsewhere, target_is_directory=True)
    older = link_run / "checkpoints" / "step-0000002"  # keep-last 2: steps 2 and 3
    fails(capsys, ["train", "--resume", str(older), "--steps", "2", "--overwrite"], "symbolic link", "step-0000003")
    assert (elsewhere / "tdrl-checkpoint.json").is_file() and (link_run / "best").is_dir()  # nothing deleted


def test_a_best_model_kept_in_a_checkpoint_is_restored_when_best_is_newer(tmp_path, capsys):
    run = tmp_path / "R"
    argv = ["train", "--agent", "bc", *TINY, "--steps", "4", "--checkpoint-every", "2", "--eval-every", "2"]
    nll = ["--no-eval-on-start", "--metric-for-best-model", "eval/teacher_nll", "--no-greater-is-better"]
    assert main([*argv, *nll, "--lr", "1e-2", "--out", str(run)]) == 0
    at2 = json.loads((run / "checkpoints" / "step-0000002" / STATE_FILE).read_text())["best"]
    uninterrupted = snapshot(run / "best")
    # the case: the checkpoint of step 2 holds the best model so far (step 2), best/ a later, better one
    assert at2["step"] == 2 and json.loads((run / "best" / "metrics.json").read_text())["step"] == 4
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoints" / "step-0000002"), "--steps", "2", "--overwrite"]) == 0
    assert json.loads((run / "best" / "metrics.json").read_text()) == {"step": 2, "metrics": at2["metrics"]}
    student = run / "checkpoints" / "step-0000002" / "student"
    assert snapshot(student).items() <= snapshot(run / "best").items()  # the step-2 student, as exported then
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert snapshot(run / "best") == uninterrupted  # and step 4 exports again what the uninterrupted run did


def records_run(tmp_path, *flags: str):
    """Issue 3's run: validation every 2 steps on the prompts of a file (with ``flags``), 4 steps."""
    records = tmp_path / "prompts.jsonl"
    records.write_text('{"prompt": "Name a colour."}\n{"prompt": "Count to three."}\n')
    run = tmp_path / "run"
    argv = ["train", "--agent", "bc", *TINY, "--steps", "4", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main([*argv, *[str(records) if f == "FILE" else f for f in flags], "--out", str(run)]) == 0
    return run, records


@pytest.mark.parametrize(
    "flag, which",
    [("--eval-data", "the validation records"), ("--test-data", "the test records")],
)
def test_a_resume_on_edited_validation_or_test_prompts_is_refused(flag, which, tmp_path, capsys):
    run, records = records_run(tmp_path, flag, "FILE", *(["--test-prompts", "2"] if flag == "--test-data" else []))
    before = snapshot(run)
    original = records.read_text()
    records.write_text('{"prompt": "Name a fruit."}\n{"prompt": "Say hello."}\n')
    fails(capsys, ["train", "--resume", str(run), "--steps", "8"], f"{which} (the prompts and references", "changed")
    assert snapshot(run) == before
    records.write_text(original)  # the prompts the run started with: it resumes
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 0


def test_a_checkpoint_without_the_records_fingerprints_resumes_with_a_warning(tmp_path, capsys, caplog):
    run, records = records_run(tmp_path, "--eval-data", "FILE")
    checkpoint = run / "checkpoints" / "step-0000004"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    for key in ("eval_records", "test_records"):
        state.pop(key)  # as tdrl wrote it before it recorded them
    (checkpoint / STATE_FILE).write_text(json.dumps(state, indent=2))
    write_manifest(checkpoint, skip=("tdrl-checkpoint.json",))
    records.write_text('{"prompt": "Name a fruit."}\n{"prompt": "Say hello."}\n')
    with caplog.at_level(logging.WARNING, logger="tdrl.training.checkpoints"):
        assert main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert "before tdrl recorded the validation and test records" in caplog.text
    state = json.loads((run / "checkpoints" / "step-0000006" / STATE_FILE).read_text())
    assert state["eval_records"] and state["test_records"] is None  # recorded from now on
