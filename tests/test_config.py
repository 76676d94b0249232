"""TrainConfig and the run records: nested groups with one flag name per leaf, the agent's Config held as
an instance, presets resolved once, every record to and from JSON, and the command line built from the
dataclasses (no default written twice)."""

import argparse
import json

import pytest

from tdrl.agents import get_agent
from tdrl.errors import ConfigError
from tdrl.training import (
    Evaluation,
    OptimConfig,
    RunSummary,
    TestResult,
    TrainConfig,
    TrainerState,
)
from tdrl.training.args import add_config_arguments, config_from_args, parse_train_args
from tdrl.training.config import config_leaves


def test_every_leaf_has_one_flag_name_and_flat_keys_reach_their_group():
    flags = [flag for *_, flag in config_leaves()]
    assert len(flags) == len(set(flags))  # one namespace for the command line, flat YAML and replace()
    config = TrainConfig.from_dict({"lr": 3e-4, "eval_every": 7, "data": "cache/", "test_seeds": "1,2"})
    assert (config.optim.lr, config.eval.every, config.data.source, config.test.seeds) == (3e-4, 7, "cache/", [1, 2])
    assert config.flat()["eval_every"] == 7 and config.flat()["data"] == "cache/"


def test_nested_and_flat_dicts_round_trip_and_agent_settings_become_an_instance():
    config = TrainConfig.from_dict({"agent": "sql", "agent_args": "alpha=0.5", "optim": {"steps": 9}})
    assert type(config.agent_config) is get_agent("sql").Config and config.agent_config.alpha == 0.5
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict()["optim"]["steps"] == 9
    # tdrl 0.1's checkpoints hold a flat dict with agent_args as a JSON string and comma-separated seeds
    old = {"agent": "bd", "agent_args": '{"alpha": 0.2}', "lr": 1e-5, "eval_seeds": "0,1", "test_seeds": ""}
    legacy = TrainConfig.from_dict(old)
    assert (legacy.agent_config.alpha, legacy.optim.lr, legacy.eval.seeds, legacy.test_seeds) == (
        0.2,
        1e-5,
        [0, 1],
        [0, 1],
    )


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="unknown setting 'lrr'"):
        TrainConfig.from_dict({"lrr": 1})
    with pytest.raises(ConfigError, match="optim has no setting"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="given twice"):
        TrainConfig.from_dict({"optim": {"lr": 1e-3}, "lr": 1e-4})
    with pytest.raises(ConfigError, match="--eval-seeds repeats a seed"):
        TrainConfig.from_dict({"eval_seeds": [0, 0]})
    with pytest.raises(ConfigError, match="--eval-seeds must be a list of int"):
        TrainConfig.from_dict({"eval_seeds": [0, 1.5]})
    with pytest.raises(ConfigError, match=r"--eval-temperature must lie in \(0, inf\), got 0.0 \(use --eval-greedy"):
        TrainConfig.from_dict({"eval_temperature": 0})
    with pytest.raises(ConfigError, match="agent 'sql' has no setting"):
        TrainConfig.from_dict({"agent": "sql", "agent_args": "chi2=false"})
    with pytest.raises(ConfigError, match="agent_config must be sql's SQLConfig"):
        TrainConfig(agent="sql", agent_config=get_agent("bd").Config())
    with pytest.raises(ConfigError, match=r"--steps must lie in \[1, inf\), got 0"):
        OptimConfig(steps=0)


def test_replace_by_flag_name_and_a_new_agent_drops_the_old_agents_settings():
    config = TrainConfig.from_dict({"agent": "sql", "agent_args": "alpha=0.5"})
    changed = config.replace(lr=1e-3, eval_every=0)
    assert (changed.optim.lr, changed.eval.every, changed.agent_config.alpha) == (1e-3, 0, 0.5)
    assert config.optim.lr == 1e-4  # a copy
    assert config.replace(agent="bc").agent_config is None
    assert config.replace(agent="bc", agent_config="mode=kd").agent_config.mode == "kd"
    with pytest.raises(ConfigError, match="unknown setting"):
        config.replace(learning_rate=1.0)


def test_presets_are_resolved_once_and_the_users_value_wins():
    bd = TrainConfig(agent="bd").resolve()
    assert bd.resolved and bd.lm.coef == 1.0 and bd.online.every == 0 and bd.online.ratio == 0.5
    assert bd.resolve() is bd  # resolving again changes nothing
    assert TrainConfig.from_dict({"agent": "bd", "lm_coef": 0.0}).resolve().lm.coef == 0.0
    gkd = TrainConfig(agent="gkd").resolve()
    assert (gkd.online.every, gkd.online.ratio, gkd.lm.coef) == (10, 0.5, 0.0)
    assert type(gkd.agent_config) is get_agent("gkd").Config
    assert not TrainConfig(agent="gkd").resolved


def test_the_device_is_checked_when_the_run_starts_not_when_the_config_is_written():
    config = TrainConfig(device="cuda:7")  # written on a machine without that GPU: fine
    from tdrl.training.config import check_device

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_device(config.device)


def test_records_round_trip_through_json():
    evaluation = Evaluation(step=3, metrics={"eval/rougeL": 12.5}, train_time_s=1.5)
    state = TrainerState(step=3, epoch=1, consumed=2, history=[evaluation], best=evaluation, data_fingerprint="f")
    assert TrainerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    summary = RunSummary(
        agent="bd",
        seed=1,
        steps=3,
        history=[evaluation],
        best=evaluation,
        test=TestResult(last={"eval/rougeL": 10.0}, best={"eval/rougeL": 11.0}, best_step=3),
        probe={"outside_mass": 0.25},
    )
    again = RunSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again == summary and again.last == evaluation
    assert (again.test_metric("best", "eval/rougeL"), again.test_metric("last", "eval/coverage") != 0) == (11.0, True)
    old = {"agent": "bc", "seed": 0, "steps": 1, "outside_mass": 0.5, "test": {"last": {"eval/rougeL": 1.0}}}
    legacy = RunSummary.from_dict(old)  # tdrl 0.1: the probe at the top level, no best
    assert legacy.probe == {"outside_mass": 0.5} and legacy.test.best == {"eval/rougeL": 1.0}


def test_a_nan_validation_never_becomes_the_best_model():
    state = TrainerState()
    assert state.improves({"m": 1.0}, "m", True)
    state.best = Evaluation(step=1, metrics={"m": 1.0})
    assert not state.improves({"m": float("nan")}, "m", True)
    assert state.improves({"m": 2.0}, "m", True) and not state.improves({"m": 2.0}, "m", False)
    assert state.improves({"m": 0.5}, "m", False)


def test_the_command_line_parses_into_the_groups_and_its_help_shows_the_effective_defaults(tmp_path):
    config, rest = parse_train_args(
        ["--agent", "sql", "--alpha", "0.3", "--eval-seeds", "0", "1,2", "--no-eval-on-start"]
    )
    assert rest == [] and config.agent_config.alpha == 0.3
    assert (config.eval.seeds, config.eval.on_start) == ([0, 1, 2], False)
    parser = argparse.ArgumentParser(prog="x")
    add_config_arguments(parser, presets={"lr": 2e-5})
    text = parser.format_help()
    assert "(default: 2e-05)" in text and "(default: 200)" in text  # the preset, else the dataclass default
    (tmp_path / "run.yaml").write_text("optim:\n  lr: 0.5\n  steps: 3\nagent: bc\nmode: kd\n")
    ns = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--steps", "4"])
    config = config_from_args(ns, presets={"lr": 2e-5})
    # presets < file < flags; the file's agent field reaches the agent's Config
    assert (config.optim.lr, config.optim.steps, config.agent_config.mode) == (0.5, 4, "kd")


def test_the_warm_start_fingerprint_is_the_one_the_flat_config_gave(tiny_teacher):
    """The shaping settings are every optim and data setting and four run settings, by flag name, plus the
    bundled data's layout schema. The digests are pinned: they changed at the compact cache layout (schema 3:
    ``annotation_keep_top_p`` joined the data group and ``bundled_schema`` the settings), since a warm start
    trained on the float32 cache of schema 2 is not the one the compact cache gives; before that they were
    tdrl 0.1's (2b1db96)."""
    from tdrl.training.warmstart import shaping_settings, warm_start_config, warm_start_fingerprint

    config = TrainConfig.from_dict({"teacher": "tiny", "student": "tiny", "train_prompts": 24})
    assert len(shaping_settings(config)) == 21 and "eval_every" not in shaping_settings(config)
    assert warm_start_fingerprint(config, tiny_teacher)[1]["bundled_schema"] == 3
    assert tiny_teacher.weights_fingerprint() == "11d7d1ef7f58b872"
    assert warm_start_fingerprint(config, tiny_teacher)[0] == "8dddd51b14784897"
    assert warm_start_fingerprint(warm_start_config(config, 256, 1e-4), tiny_teacher)[0] == "8813c5034bd6ee6c"
    assert warm_start_fingerprint(config.replace(eval_every=3), tiny_teacher)[0] == "8dddd51b14784897"
    assert warm_start_fingerprint(config.replace(adam_beta2=0.9), tiny_teacher)[0] != "8dddd51b14784897"


def test_commands_accept_only_the_flags_they_use(capsys):
    """compare and demo take their agents from --agents specs, warm-start fixes its agent and runs no test,
    collects no episodes and adds no J_PT: such flags are refused (one line), not accepted and ignored."""
    from tdrl.cli import main

    for argv, flag in (
        (["compare", "--agent-args", "top_p=0.5"], "--agent-args"),
        (["demo", "--agent", "sql"], "--agent"),
        (["warm-start", "--test-prompts", "4"], "--test-prompts"),
        (["warm-start", "--lm-coef", "1"], "--lm-coef"),
        (["train", "--resume", "runs/x", "--agent-args", "top_p=0.5"], "only --steps may change"),
        (["train", "--bogus"], "see `tdrl train --help`"),
        (["train", "--eval-seeds", "a"], "seeds must be integers"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1, (argv, err)
    assert main(["train", "--agent", "gkd", "--help"]) == 0
    assert "(default: 10)" in capsys.readouterr().out  # gkd's preset of --online-every, not "unset"


def test_a_resolved_config_refuses_a_new_agent_and_replace_takes_groups_and_instances():
    resolved = TrainConfig(agent="gkd").resolve()
    with pytest.raises(ConfigError, match="resolved for gkd"):
        resolved.replace(agent="bc")  # its online_every 10 is gkd's preset, not the user's
    assert resolved.replace(agent="bc", online_every=0, online_ratio=0.5, lm_coef=0.0).online.every == 0
    assert TrainConfig().replace(eval={"every": 0}).eval.every == 0
    assert TrainConfig().replace(data={"train_prompts": 5}).data.train_prompts == 5
    with pytest.raises(ConfigError, match="IQLearnConfig"):
        TrainConfig(agent="iqlearn").replace(agent_config=get_agent("bc").Config())
    assert TrainConfig.from_dict({"test_data": "my.jsonl", "test_split": 2024}).test.split == "2024"  # YAML: a number


def test_atomic_dir_clears_a_killed_writers_leftovers_unless_shared(tmp_path):
    from tdrl.integrity import atomic_dir

    stale = tmp_path / ".out.tmp-tok"
    stale.mkdir()
    (stale / "stale.bin").write_text("x")
    with atomic_dir(tmp_path / "out", token="tok") as tmp:
        (tmp / "new").write_text("1")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]
    stale.mkdir()
    (stale / "rank1.pkl").write_text("written by another rank")
    with atomic_dir(tmp_path / "out", token="tok", shared=True) as tmp:
        (tmp / "rank0.pkl").write_text("1")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rank0.pkl", "rank1.pkl"]


def test_compare_refuses_agent_settings_from_its_config_file(tmp_path, capsys):
    from tdrl.cli import main

    (tmp_path / "a.yaml").write_text("agent: sql\nalpha: 0.5\n")
    assert main(["compare", "--config", str(tmp_path / "a.yaml"), "--teacher", "tiny"]) == 2
    assert "chooses its agents itself" in capsys.readouterr().err
