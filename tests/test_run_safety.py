"""Issue 21's data-loss cases and the guard against non-finite training, each with its reproduction:
nothing of the user's is deleted unasked, no link in a run directory is written through, a diverged run
never writes (or rotates in) a checkpoint, a comparison is not silently replaced, and bad values are
refused when the config is built, not after training."""

import math
import re
import shutil

import pytest
import torch

from tdrl.agents import BC, register_agent
from tdrl.agents.bc import BCConfig
from tdrl.cli import main
from tdrl.training.checkpoints import find_checkpoint

TINY = (
    "--teacher tiny --student tiny --data bundled --train-prompts 16 --response-tokens 6 --batch-size 4 "
    "--eval-prompts 2 --eval-max-new-tokens 4 --test-prompts 0 --eval-every 0"
).split()


def fails(capsys, argv, *needles) -> str:
    """``tdrl argv`` exits 2 with one line on stderr holding every needle, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tdrl:")]  # progress bars may precede it
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def train(out, *extra) -> int:
    return main(["train", "--agent", "bc", "--steps", "2", "--checkpoint-every", "1", "--out", str(out), *TINY, *extra])


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))


def test_d1_the_users_files_in_out_are_never_deleted_unasked(tmp_path, capsys):
    out = tmp_path / "u"
    (out / "best").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "best" / "w.bin").write_text("x")
    (out / "checkpoints" / "README").write_text("n")
    (out / "events.out.tfevents.1.x").touch()
    fails(capsys, ["train", "--agent", "bc", "--steps", "1", "--out", str(out), *TINY], "no tdrl run", "--overwrite")
    assert (out / "best" / "w.bin").read_text() == "x" and (out / "checkpoints" / "README").is_file()
    assert (out / "events.out.tfevents.1.x").is_file()
    # a run's own leftovers (a start that failed before its first checkpoint) are cleared by the rerun
    run = tmp_path / "r"
    assert train(run, "--steps", "1") == 0
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints")
    assert train(run) == 0 and find_checkpoint(run).name == "step-0000002"


def test_d3_no_link_in_a_run_directory_is_written_through(tmp_path, capsys):
    other = tmp_path / "other"
    assert train(other) == 0
    theirs = sorted(p.name for p in (other / "checkpoints").iterdir())
    out = tmp_path / "r" / "s"
    out.mkdir(parents=True)
    (out / "checkpoints").symlink_to(other / "checkpoints")
    fails(capsys, ["train", "--agent", "bc", "--steps", "1", "--out", str(out), *TINY], "symbolic link")
    fails(capsys, ["train", "--resume", str(out)], "symbolic link")
    assert train(out, "--overwrite", "--keep-last", "2") == 0  # removes the link, never its target
    assert not (out / "checkpoints").is_symlink() and find_checkpoint(out).name == "step-0000002"
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == theirs


@register_agent("test-turns-nan")
class TurnsNaN(BC):
    """bc whose loss turns NaN from its third step on (a plug-in agent gone wrong)."""

    Config = BCConfig
    description = "test only"

    def loss(self, t, batch):
        self.calls = getattr(self, "calls", 0) + 1
        loss, metrics = super().loss(t, batch)
        return (loss * float("nan") if self.calls >= 3 else loss), metrics


@register_agent("test-explodes")
class Explodes(BC):
    """bc whose gradients overflow to inf from its third step on, its loss still finite."""

    Config = BCConfig
    description = "test only"

    def loss(self, t, batch):
        self.calls = getattr(self, "calls", 0) + 1
        loss, metrics = super().loss(t, batch)
        return (loss * 3e38 if self.calls >= 3 else loss), metrics


def test_d5_exploding_gradients_stop_the_step_before_the_optimiser(tmp_path, capsys):
    out = tmp_path / "inf"
    argv = ["train", "--agent", "test-explodes", "--steps", "6", "--checkpoint-every", "1", "--keep-last", "1"]
    fails(capsys, [*argv, "--out", str(out), *TINY], "diverged at step 3", "gradient norm is", "loss inf")
    assert find_checkpoint(out, verify=True).name == "step-0000002"


def test_d4_a_diverged_run_names_the_loss_and_keeps_its_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    argv = ["train", "--agent", "test-turns-nan", "--steps", "6", "--checkpoint-every", "1", "--keep-last", "1"]
    fails(capsys, [*argv, "--log-every", "5", "--out", str(out), *TINY], "diverged at step 3", "step-0000002")
    checkpoint = find_checkpoint(out, verify=True)
    assert checkpoint.name == "step-0000002"  # the finite one was not rotated out by a NaN one
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "student" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    # the step that would apply the NaN gradients is stopped before the optimiser, naming the loss
    fails(capsys, [*argv, "--log-every", "1", "--out", str(tmp_path / "n2"), *TINY], "gradient norm is nan (loss nan")


def test_d6_a_comparison_is_not_replaced_silently(tmp_path, capsys):
    out = tmp_path / "c"
    flags = ["--seeds", "1", "--steps", "1", *TINY, "--out", str(out)]
    assert main(["compare", "--agents", "bc", *flags, "--no-eval-on-start"]) == 0
    before = (out / "results.md").read_text()
    fails(capsys, ["compare", "--agents", "sql", *flags], "already holds a `tdrl compare` comparison", "--overwrite")
    assert (out / "results.md").read_text() == before and "bc" in before


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lr", "inf"], "lr must be a finite number"),  # S1
        (["--agent", "sql", "--support-coef", "nan"], "support_coef must be a finite number"),  # S3
        (["--agent", "bd", "--agent-args", "alpha=.inf"], "alpha must be a finite number"),  # B7
        (["--metric-for-best-model", "eval/rouge"], "not an evaluation metric"),  # B1
        (["--eval-temperature", "0"], "--eval-temperature must lie in (0, inf)"),  # B2
        (["--eval-seeds", ","], "at least one seed"),  # B4
        (["--eval-seeds", "99999999999999999999"], "must lie in [0, 2**31)"),  # B5
        (["--eval-seeds", "0", "0", "0"], "repeats a seed"),  # S7
        (["--checkpoint-every", "0"], "--checkpoint-every must lie in [1, inf)"),  # T2
        (["--lm-seq-len", "0"], "--lm-seq-len must lie in [1, inf)"),  # T3
        (["--train-prompts", "-1"], "--train-prompts must lie in [0, inf)"),  # B9
    ],
)
def test_bad_values_are_refused_before_anything_runs(flags, needle, tmp_path, capsys):
    out = tmp_path / "x"
    fails(capsys, ["train", "--steps", "1", *TINY, *flags, "--out", str(out)], needle)
    assert not out.exists()  # refused before anything was written


def test_compare_refuses_a_spec_given_twice_before_training(tmp_path, capsys):  # S10, B10
    out = tmp_path / "c"
    fails(capsys, ["compare", "--agents", "bc,bc", "--steps", "1", *TINY, "--out", str(out)], "given twice")
    fails(capsys, ["compare", "--agents", "bc,bd:alpha=abc", "--steps", "1", *TINY, "--out", str(out)], "alpha")
    assert not (out / "runs").exists()


def test_nan_is_not_a_number_the_best_model_can_have():
    from tdrl.training import Evaluation, TrainerState

    state = TrainerState(best=Evaluation(step=0, metrics={"eval/rougeL": 1.0}))
    assert not state.improves({"eval/rougeL": math.nan}, "eval/rougeL", True)


@pytest.mark.parametrize(
    "agent, settings, needle",
    [
        ("iqlearn", {"q_min": 5.0}, "q_min must lie in (-inf, 0)"),  # S4: every Q clipped, zero gradient
        ("cql", {"cql_alpha": -100.0}, "cql_alpha must lie in [0, inf)"),  # S5: an unbounded loss
        ("minillm", {"clip": -1.0}, "clip must lie in (0, inf)"),  # S6
        ("iql", {"tau": 5.0}, "tau must lie in (0, 1]"),  # S2
    ],
)
def test_every_agent_checks_its_ranges(agent, settings, needle):
    from tdrl.agents import get_agent
    from tdrl.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        get_agent(agent).Config(**settings)


def test_b6_an_exponent_without_a_dot_is_a_number_not_a_string(tmp_path):
    from tdrl.training import TrainConfig
    from tdrl.training.args import parse_train_args

    assert TrainConfig.from_dict({"agent": "bd", "agent_args": "alpha=1e-3"}).agent_config.alpha == 1e-3
    (tmp_path / "run.yaml").write_text("lr: 3e-4\nagent: bd\nalpha: 2e-3\n")  # YAML 1.1 reads both as strings
    config, _ = parse_train_args(["--config", str(tmp_path / "run.yaml")])
    assert (config.optim.lr, config.agent_config.alpha) == (3e-4, 2e-3)


def test_t18_s19_an_agent_needs_a_student_and_a_plain_name():
    from tdrl.agents import make_agent, register_agent
    from tdrl.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a student"):
        make_agent("bc", None)
    for bad in ("", "BC", "../../evil", "bd:x", 7):
        with pytest.raises(ConfigError, match="agent name"):
            register_agent(bad)


def test_t19_s21_a_broken_or_clashing_entry_point_is_named_not_fatal(monkeypatch):
    from importlib import metadata

    import tdrl.agents.registry as registry

    points = [
        metadata.EntryPoint(name="broken", value="no_such_module_xyz:Agent", group="tdrl.agents"),
        metadata.EntryPoint(name="bc", value="tdrl.agents.sql:SQL", group="tdrl.agents"),  # claims a built-in name
    ]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: points)
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    with pytest.warns(UserWarning) as caught:
        names = registry.list_agents()
    messages = " ".join(str(w.message) for w in caught)
    assert "'broken'" in messages and "failed to import" in messages and "'bc'" in messages and "ignored" in messages
    assert "bc" in names and "broken" not in names and registry.get_agent("bc").__name__ == "BC"


def test_t6_to_t10_eval_checks_its_inputs_before_any_work(tmp_path, capsys):
    from tdrl.models import load_student

    student = load_student("tiny")
    bare = tmp_path / "bare"
    student.save_pretrained(bare)  # an exported model without tdrl-run.json
    fails(capsys, ["eval", "--checkpoint", str(bare), "--prompts", "1"], "pass --teacher")  # T6 / T7
    fails(capsys, ["eval", "--checkpoint", str(bare), "--teacher", "tiny", "--device", "banana"], "unknown device")
    flags = ["--teacher", "tiny", "--prompts", "1", "--max-new-tokens"]
    fails(capsys, ["eval", "--checkpoint", str(bare), *flags, "100000"], "does not fit the models' context")  # T9
    fails(capsys, ["eval", "--checkpoint", str(bare), *flags, "2", "--seeds", "5", "5"], "repeats a seed")
    student.tokenizer.add_tokens(["zzzunseen"])  # another vocabulary
    other = tmp_path / "other"
    student.save_pretrained(other)
    fails(capsys, ["eval", "--checkpoint", str(other), *flags, "2"], "vocabular")  # T8
    assert main(["eval", "--checkpoint", str(bare), *flags, "2", "--seeds", "0"]) == 0
    import json

    (bare / "tdrl-warm-start.json").write_text(json.dumps({"settings": {"teacher": "tiny"}}))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(bare), "--prompts", "1", "--max-new-tokens", "2", "--seeds", "0"]) == 0
    assert "teacher tiny" in capsys.readouterr().out  # a warm start's record names its teacher


def test_s12_to_s17_discounts_and_penalties_are_checked_where_they_enter(tmp_path, capsys):
    import gymnasium as gym

    from tdrl.errors import ConfigError
    from tdrl.testing import tiny_teacher

    source = tmp_path / "d.jsonl"
    source.write_text('{"prompt": "Say hi.", "response": "Hi!"}\n')
    for gamma in ("nan", "5"):  # S12, S13
        argv = ["annotate", "--teacher", "tiny", "--source", str(source), "--out", str(tmp_path / gamma)]
        fails(capsys, [*argv, "--reward", "inverse_soft_q", "--gamma", gamma], "gamma must lie in [0, 1]")
    teacher = tiny_teacher()
    for bad in ({"gamma": 5.0}, {"gamma": float("nan")}, {"gamma": -3.0}, {"off_support_penalty": float("nan")}):
        with pytest.raises(ConfigError):  # S16, S17
            gym.make("tdrl/TokenGeneration-v0", teacher=teacher, prompts=["Hi."], **bad)
    with pytest.raises(ConfigError, match="num_envs"):  # T16
        gym.make_vec(
            "tdrl/TokenGeneration-v0",
            num_envs=True,
            vectorization_mode="vector_entry_point",
            teacher=teacher,
            prompts=["Hi."],
        )
    env = gym.make("tdrl/TokenGeneration-v0", teacher=teacher, prompts=["Hi."], max_new_tokens=2)
    for prompt, error in (
        ([99999], "outside the vocabulary"),
        ([-5, 3], "outside the vocabulary"),
        (42, "a prompt is"),
    ):
        with pytest.raises((ValueError, TypeError), match=error):  # T12, T13, T14
            env.reset(options={"prompt": prompt})
    obs, _ = env.reset(options={"prompt": [1, 2, 3]})  # valid ids still work
    assert int(obs["prompt_length"]) == 3


def test_t17_b8_t4_sources_and_layer_cuts_say_what_they_take(capsys):
    from tdrl.data import load_source
    from tdrl.errors import ConfigError, DataError
    from tdrl.models import load_student
    from tdrl.testing import tiny_teacher

    for bad in (123, None):
        with pytest.raises(DataError, match="a data source is"):
            load_source(bad)
    for name in ("layers:-1", "layers:", "layers:1,,2"):
        with pytest.raises(ConfigError, match="comma-separated teacher layer indices"):
            load_student(name, teacher=tiny_teacher())
    with pytest.raises(ConfigError, match="repeats a teacher layer"):
        load_student("layers:1,1,1", teacher=tiny_teacher())


def test_s9_a_copied_checkpoint_is_not_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    copy = tmp_path / "ck"
    shutil.copytree(run / "checkpoints" / "step-0000001", copy)
    fails(capsys, ["train", "--resume", str(copy), "--steps", "3"], "outside its run directory")
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in (run / "checkpoints" / "step-0000001").iterdir()
    )


def test_b13_ctrl_c_advice_fits_the_command():
    from tdrl.cli import _interrupted

    assert "run the same command again" in _interrupted("annotate", "interrupted at step 3; resume with --resume X")
    assert "resume the warm start" in _interrupted("warm-start", "resume with --resume runs/.w.partial-1/run")
    assert _interrupted("train", "interrupted at step 3; resume with --resume runs/x") == (
        "interrupted at step 3; resume with --resume runs/x"
    )


def test_b9_b14_leftovers_limits_and_directories_that_are_not_models(tmp_path, capsys):
    source = tmp_path / "d.jsonl"
    source.write_text('{"prompt": "Say hi.", "response": "Hi!"}\n')
    argv = ["annotate", "--teacher", "tiny", "--source", str(source), "--out", str(tmp_path / "a"), "--limit", "-1"]
    fails(capsys, argv, "--limit must be >= 1")  # B9
    not_a_model = tmp_path / "etc"
    (not_a_model / "passwd").parent.mkdir()
    (not_a_model / "passwd").write_text("root:x:0:0")
    fails(
        capsys,
        ["train", "--steps", "1", *TINY, "--student", str(not_a_model), "--out", str(tmp_path / "s")],
        "not a model directory",
    )
    fails(capsys, ["teacher-info", "--teacher", str(not_a_model)], "not a model directory")  # B14
    # a writer killed mid-checkpoint leaves atomic_dir's temporaries: the next claim of the run clears them
    run = tmp_path / "run"
    assert train(run) == 0
    (run / "checkpoints" / ".step-0000003.tmp-dead").mkdir()
    (run / ".best.old-dead").mkdir()
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0
    left = [p.name for p in (run / "checkpoints").iterdir()] + [p.name for p in run.iterdir()]
    assert not [name for name in left if ".tmp-" in name or ".old-" in name], left


def test_t5_a_full_disk_during_a_checkpoint_loses_nothing_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    import errno

    from accelerate import Accelerator

    run = tmp_path / "run"
    assert train(run) == 0  # checkpoints 1 and 2
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    save_state = Accelerator.save_state

    def full_disk(self, output_dir, **kw):
        save_state(self, output_dir, **kw)  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    fails(capsys, ["train", "--resume", str(run), "--steps", "3"], "No space left on device")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # no temporary, nothing rotated out
    assert find_checkpoint(run, verify=True).name == "step-0000002"


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lr", "-1"], "--lr must lie in [0, inf)"),
        (["--adam-beta2", "1"], "--adam-beta2 must lie in [0, 1)"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must lie in [0, inf)"),
    ],
)
def test_every_optimisation_setting_has_its_range(flags, needle, tmp_path, capsys):
    fails(capsys, ["train", "--steps", "1", *TINY, *flags, "--out", str(tmp_path / "x")], needle)


def test_second_hostile_pass_overwrite_replaces_only_what_tdrl_wrote(tmp_path, capsys):
    """warm-start --overwrite over a directory that is no warm start, and train --overwrite over a run
    whose checkpoints/ holds someone else's directory: nothing but tdrl's own files is replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    warm = ["warm-start", "--teacher", "tiny", "--student", "tiny", "--data", "bundled", "--train-prompts", "16"]
    warm += ["--response-tokens", "6", "--batch-size", "4", "--eval-prompts", "2", "--eval-max-new-tokens", "4"]
    fails(capsys, [*warm, "--steps", "2", "--out", str(mine), "--overwrite"], "is not a tdrl warm start")
    assert (mine / "notes.txt").read_text() == "precious"
    run = tmp_path / "r1"
    assert train(run) == 0
    nested = run / "checkpoints" / "nested"
    nested.mkdir()
    (nested / "keep.txt").write_text("k")
    assert train(run, "--overwrite") == 0
    assert (nested / "keep.txt").read_text() == "k" and find_checkpoint(run).name == "step-0000002"
    (run / "best" / "tdrl-run.json").unlink()  # best/ now looks like the user's, not a tdrl export
    fails(
        capsys, ["train", "--agent", "bc", "--steps", "1", "--out", str(run), *TINY, "--overwrite"], "not a tdrl export"
    )


def test_second_hostile_pass_duplicates_options_and_columns_are_refused(tmp_path, capsys):
    import gymnasium as gym

    from tdrl.data import load_source
    from tdrl.errors import ConfigError, DataError
    from tdrl.testing import tiny_teacher

    (tmp_path / "c.yaml").write_text("lr: 0.001\nlr: 0.5\n")
    fails(
        capsys, ["train", "--config", str(tmp_path / "c.yaml"), *TINY, "--out", str(tmp_path / "x")], "lr given twice"
    )
    for spec in ("gamma=0.5,gamma=0.6", '{"gamma": 0.5, "gamma": 0.6}'):
        fails(capsys, ["train", "--agent", "sql", "--agent-args", spec, *TINY, "--out", str(tmp_path / "y")], "twice")
    teacher = tiny_teacher()
    env = gym.make("tdrl/TokenGeneration-v0", teacher=teacher, prompts=["Hi."], max_new_tokens=2)
    with pytest.raises(ConfigError, match="not read by this env"):
        env.reset(options={"prompts": ["Tell me a joke"]})  # the vector env's key, misspelt here
    with pytest.raises(ConfigError, match="one string"):
        gym.make("tdrl/TokenGeneration-v0", teacher=teacher, prompts="hello")
    (tmp_path / "dup.csv").write_text("prompt,prompt,response\na,b,c\n")
    with pytest.raises(DataError, match="appear twice"):
        load_source(str(tmp_path / "dup.csv"))
    (tmp_path / "bom.csv").write_text("\ufeffprompt,response\nSay hi.,Hi!\n", encoding="utf-8")
    assert load_source(str(tmp_path / "bom.csv"))["prompt"] == ["Say hi."]
    fails(capsys, ["train", *TINY, "--out", ""], "--out must name a run directory")


def test_second_hostile_pass_eval_of_a_checkpoint_and_compare_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    step = run / "checkpoints" / "step-0000002"
    assert main(["eval", "--checkpoint", str(step), "--prompts", "1", "--max-new-tokens", "2", "--seeds", "0"]) == 0
    out = tmp_path / "c"
    flags = ["--seeds", "1", "--steps", "1", *TINY, "--no-eval-on-start", "--out", str(out)]
    assert main(["compare", "--agents", "bc", *flags]) == 0
    assert main(["compare", "--agents", "kd", *flags, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir() if p.name != "start") == ["kd-seed0"]  # bc's run went too


def test_replace_takes_agent_settings_and_a_file_is_no_output_directory(tmp_path, capsys):
    from tdrl.training import TrainConfig

    config = TrainConfig.from_dict({"agent": "sql", "agent_args": "alpha=0.3"}).replace(gamma=0.5)
    assert (config.agent_config.gamma, config.agent_config.alpha) == (0.5, 0.3)
    source = tmp_path / "d.jsonl"
    source.write_text('{"prompt": "Say hi.", "response": "Hi!"}\n')
    (tmp_path / "file").write_text("mine")
    argv = ["annotate", "--teacher", "tiny", "--source", str(source), "--out", str(tmp_path / "file")]
    fails(capsys, argv, "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_third_hostile_pass_nested_runs_links_and_what_overwrite_may_touch(tmp_path, capsys):
    run = tmp_path / "A"
    assert train(run) == 0
    for inside in (run / "checkpoints" / "step-0000002", run / "best", run / "sub"):  # rotated or replaced later
        fails(capsys, ["train", "--agent", "bc", "--steps", "1", "--out", str(inside), *TINY], "lies inside the run")
    project = tmp_path / "P"
    assert train(project / "runs" / "myexp") == 0  # the user's own run where a comparison will go
    flags = ["--seeds", "1", "--steps", "1", *TINY, "--no-eval-on-start", "--out", str(project)]
    assert main(["compare", "--agents", "bc", *flags, "--overwrite"]) == 0
    assert main(["compare", "--agents", "kd", *flags, "--overwrite"]) == 0
    names = sorted(p.name for p in (project / "runs").iterdir() if p.name != "start")
    assert names == ["kd-seed0", "myexp"]  # bc's run, listed by the replaced comparison, went; the user's stayed
    linked = tmp_path / "Q"
    linked.mkdir()
    (linked / "runs").symlink_to(project / "runs")
    fails(capsys, ["compare", "--agents", "bd", *flags[:-1], str(linked), "--overwrite"], "symbolic link")
    assert (project / "runs" / "kd-seed0").is_dir()


def test_third_hostile_pass_warm_starts_keep_what_is_beside_them_and_see_their_students_weights(tmp_path, capsys):
    from tdrl.models import load_student
    from tdrl.testing import tiny_teacher
    from tdrl.training import TrainConfig
    from tdrl.training.warmstart import warm_start_fingerprint

    student_dir = tmp_path / "S"
    student = load_student("tiny")
    student.save_pretrained(student_dir)
    config = TrainConfig.from_dict({"teacher": "tiny", "student": str(student_dir)})
    before = warm_start_fingerprint(config, tiny_teacher())[0]
    with torch.no_grad():
        next(student.model.parameters()).add_(1.0)
    student.save_pretrained(student_dir)  # the same directory, other weights
    assert warm_start_fingerprint(config, tiny_teacher())[0] != before
    warm = ["warm-start", "--teacher", "tiny", "--student", "tiny", "--data", "bundled", "--train-prompts", "16"]
    warm += ["--response-tokens", "6", "--batch-size", "4", "--eval-prompts", "2", "--eval-max-new-tokens", "4"]
    out = tmp_path / "W"
    assert main([*warm, "--steps", "2", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("user")
    fails(capsys, [*warm, "--steps", "3", "--out", str(out), "--overwrite"], "notes.txt beside its warm start")
    assert (out / "notes.txt").read_text() == "user"
    (out / "notes.txt").unlink()
    assert main([*warm, "--steps", "3", "--out", str(out), "--overwrite"]) == 0  # its own files: replaced


def test_third_hostile_pass_replace_refuses_a_setting_given_twice():
    from tdrl.errors import ConfigError
    from tdrl.training import TrainConfig

    with pytest.raises(ConfigError, match="steps given twice"):
        TrainConfig().replace(optim={"steps": 3}, steps=4)


def test_fourth_hostile_pass_comparisons_own_their_directory(tmp_path, capsys):
    """A demo never replaces a `tdrl compare` result (only an earlier demo's); a second comparison into a
    directory being written is refused (the directory is locked for the whole comparison); --seed offsets
    the seeds of a comparison instead of being ignored."""
    import csv
    import json

    from tdrl.compare import COMPARISON_FILE
    from tdrl.integrity import DirectoryLock

    out = tmp_path / "c"
    flags = ["--seeds", "1", "--steps", "1", *TINY, "--out", str(out)]
    assert main(["compare", "--agents", "bc", *flags, "--seed", "5", "--no-eval-on-start"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["bc-seed5"]
    assert [r["seed"] for r in csv.DictReader((out / "results.csv").open())] == ["5", "5"]  # the start row, bc
    assert json.loads((out / COMPARISON_FILE).read_text()) == {
        "command": "compare",
        "agents": ["bc"],
        "seeds": [5],
        "complete": True,
    }
    before = (out / "results.md").read_text()
    demo = ["demo", "--agents", "sft", "--warm-start-steps", "1", "--teacher-dtype", "float32", "--mixed-precision"]
    fails(capsys, [*demo, "no", *flags], "already holds a `tdrl compare` comparison", "--overwrite")
    assert (out / "results.md").read_text() == before and (out / "runs" / "bc-seed5").is_dir()
    assert not (out / "warm-start").exists()  # refused before the warm start trained
    with DirectoryLock(out, "comparison directory"):  # another comparison is writing here
        fails(capsys, ["compare", "--agents", "sql", *flags, "--overwrite"], "another tdrl process is writing")
    assert (out / "results.md").read_text() == before


def test_fourth_hostile_pass_resumed_writers_never_mix_settings_or_keep_damage(tmp_path, capsys):
    """generate-responses samples with one seed per batch, so its batch size shapes the responses: a resume
    with another --batch-size is refused (a complete directory of tdrl 0.2, which did not record it, still
    counts as the same job). A shard damaged in place (same size, a flipped byte) is rebuilt by rerunning
    annotate, as the load error advises, instead of being kept by a size-only check."""
    import json

    import datasets

    from tdrl.data import annotate, generate_responses, load_annotations, load_source
    from tdrl.errors import DataError
    from tdrl.testing import tiny_teacher

    teacher = tiny_teacher()
    prompts = load_source("bundled", split="train").select(range(8))
    kwargs = dict(max_new_tokens=4, shard_size=4, seed=0)
    out = tmp_path / "gen"
    generate_responses(teacher, prompts, out, batch_size=4, stop_after_shards=1, **kwargs)
    with pytest.raises(DataError, match="batch_size"):
        generate_responses(teacher, prompts, out, batch_size=2, **kwargs)
    generate_responses(teacher, prompts, out, batch_size=4, **kwargs)  # the same job resumes
    meta_path = out / "tdrl-responses.json"
    meta = json.loads(meta_path.read_text())
    del meta["settings"]["batch_size"]  # as tdrl 0.2 wrote it
    meta_path.write_text(json.dumps(meta))
    assert generate_responses(teacher, prompts, out, batch_size=4, **kwargs) == out  # complete: reused
    meta["complete"] = False
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="batch_size"):  # incomplete: resuming it could mix the batch sizes
        generate_responses(teacher, prompts, out, batch_size=4, **kwargs)

    rows = datasets.Dataset.from_list([{"id": str(i), "prompt": f"p {i}", "response": f"r {i} " * 3} for i in range(6)])
    cache = annotate(teacher, rows, tmp_path / "ann", top_k=8, shard_size=3)
    before = load_annotations(cache).to_dict()
    arrow = sorted((cache / "shards" / "shard-00001").glob("data-*.arrow"))[0]
    data = bytearray(arrow.read_bytes())
    data[-100] ^= 0xFF
    arrow.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged.*rerun `tdrl annotate`"):
        load_annotations(cache)
    annotate(teacher, rows, tmp_path / "ann", top_k=8, shard_size=3)
    assert load_annotations(cache).to_dict() == before
