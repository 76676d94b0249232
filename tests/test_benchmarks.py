"""The benchmark helpers measure what they say (no timings asserted), and reproduce.py's plumbing runs."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks import annotate_speed, reproduce, topp_stats
from benchmarks.memory import PeakMemory


def test_peak_memory_sees_a_block_allocation_and_not_earlier_ones():
    resident = torch.ones(32 * 2**20 // 4)  # 32 MiB allocated before the block: not counted
    with PeakMemory("cpu") as before:
        pass
    with PeakMemory("cpu") as peak:
        block = torch.ones(256 * 2**20 // 4)  # 256 MiB, pages touched
    assert 200 * 2**20 < peak.peak_bytes < 400 * 2**20
    assert before.peak_bytes < 64 * 2**20
    del resident, block


def test_annotation_processes_run_one_thread_each_and_the_cores_shared_out(monkeypatch):
    monkeypatch.setattr(annotate_speed.os, "cpu_count", lambda: 2)
    assert annotate_speed.runs([1, 2]) == [(1, 2), (1, 1), (2, 1)]  # one process: all threads, then one
    monkeypatch.setattr(annotate_speed.os, "cpu_count", lambda: 8)
    assert annotate_speed.runs([1, 4]) == [(1, 8), (1, 1), (4, 2), (4, 1)]


def test_top_p_statistics_by_hand():
    probs = torch.tensor([[0.55, 0.3, 0.08, 0.04, 0.03], [0.91, 0.05, 0.02, 0.01, 0.01]])
    stats = topp_stats.statistics(probs.log(), top_k=3)
    # row 1: p=.5 -> {0}; .8 -> {0,1}; .9 and .95 -> capped at k=3 (mass .93); row 2: {0} up to p=.9, .95 -> {0,1}
    assert stats["p"][0.5]["size_mean"] == 1 and stats["p"][0.5]["mass_mean"] == pytest.approx(0.73)
    assert stats["p"][0.8]["size_mean"] == 1.5 and stats["p"][0.8]["mass_mean"] == pytest.approx(0.88)
    assert stats["p"][0.9]["size_mean"] == 2 and stats["p"][0.9]["capped"] == 0.5
    assert stats["p"][0.95]["size_mean"] == 2.5 and stats["p"][0.95]["mass_mean"] == pytest.approx(0.945)
    assert stats["top7"]["mean"] == pytest.approx(1.0) and stats["top50"]["at_least_0.9"] == 1.0


def test_reproduce_smoke_plumbing(tmp_path, monkeypatch):
    """One seed, a few steps, the tiny models: tables, verdict, curve and the record file that makes a
    second call reuse finished runs instead of training again."""
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path / "cache"))
    argv = ["--budget", "smoke", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "r")]
    text = reproduce.main(argv)
    for needle in ("| BD |", "| SFT / SeqKD |", "BD without chi^2", "Time to quality", "Without the warm start"):
        assert needle in text
    records = json.loads((tmp_path / "r" / "records.json").read_text())
    runs = [r for r in records.values() if isinstance(r, dict) and "test" in r]
    # main table, new ablations, kd-online, the two raw-student runs
    assert len(runs) == len(reproduce.MAIN) + len(reproduce.ABLATIONS) - 1 + 1 + 2
    (start,) = [r for k, r in records.items() if k.startswith("start-")]  # the warm start, once per seed
    assert [row["seed"] for row in start] == [0] and "| warm start (no further training) | 1 |" in text
    assert all(not (tmp_path / "r" / "runs" / d / "checkpoints").exists() for d in ("bd-seed0", "kd-online-seed0"))
    assert (tmp_path / "r" / "rouge_vs_time.png").stat().st_size > 0
    # the same call again trains nothing: every run is read back from records.json
    mtime = (tmp_path / "r" / "records.json").stat().st_mtime_ns
    again = reproduce.main(argv)
    assert again.split("Reproduction wall time")[0] == text.split("Reproduction wall time")[0]
    assert f"{len(runs)} runs were recorded by an earlier call and reused" in again
    assert (tmp_path / "r" / "records.json").stat().st_mtime_ns == mtime


def test_paper_budget_is_the_papers_protocol():
    """The ``paper`` budget: AdamW (0.9, 0.95), lr 5e-6, effective batch 64, warm-up then cosine, about one
    pass over the 1,810 training responses, 5 test sampling seeds on the held-out prompts, from the
    recipe's warm start."""
    from tdrl.commands import WARM_START_STEPS
    from tdrl.data import load_source
    from tdrl.training.warmstart import RECIPE

    budget = reproduce.BUDGETS["paper"]
    config = reproduce.base_config(budget, "cpu", Path("/tmp/unused"))
    optim = config.optim
    assert (optim.lr, optim.adam_beta1, optim.adam_beta2, optim.schedule) == (5e-6, 0.9, 0.95, "cosine")
    assert optim.batch_size * optim.grad_accum == 64 and 0 < optim.warmup_steps < optim.steps // 5
    responses = len(load_source("bundled", split="train"))
    assert config.data.train_prompts == 0 and abs(optim.steps * 64 - responses) < 64  # one pass
    assert config.test.split_name == "heldout" and config.test_seeds == [0, 1, 2, 3, 4]
    assert config.eval.split == "validation" and config.student == RECIPE["student"]
    assert not config.eval.on_start  # the runs' histories start after training has, as they always did
    assert budget["warm_start_lr"] == RECIPE["lr"] and budget["warm_start_steps"] == WARM_START_STEPS
    specs = [spec for _, spec in budget["main"] + budget["ablations"]]
    released = {"bd:max_over=vocab", "bd:max_over=vocab,chi2=false", "bd:max_over=vocab,top_p=1.0"}
    assert {"bc:mode=sft", "bc:mode=kd", "minillm", "bd:max_over=set"} | released <= set(specs)


def test_demo_and_paper_budget_share_one_warm_start():
    """``tdrl demo`` and ``--budget paper`` build their warm starts with one helper from one recipe: every
    setting that shapes the weights agrees, so one cached warm start (one fingerprint) serves both."""
    from tdrl.commands import WARM_START_STEPS
    from tdrl.comparing import DEMO_DEFAULTS
    from tdrl.training.args import parse_train_args
    from tdrl.training.warmstart import RECIPE, shaping_settings, warm_start_config

    budget = reproduce.BUDGETS["paper"]
    paper = reproduce.base_config(budget, "cpu", Path("/tmp/unused"))
    paper = warm_start_config(paper, budget["warm_start_steps"], budget["warm_start_lr"], budget["warm_start"])
    demo, _ = parse_train_args([], presets=DEMO_DEFAULTS, agent_flags=False, prog="tdrl demo")
    demo = warm_start_config(demo, WARM_START_STEPS, RECIPE["lr"])
    assert shaping_settings(demo) == shaping_settings(paper)
    d = demo.flat()
    assert (d["steps"], d["lr"], d["batch_size"], d["schedule"]) == (256, RECIPE["lr"], 8, "constant")
    assert d["warmup_steps"] == RECIPE["warmup_steps"] and d["grad_accum"] == 1 and d["seed"] == 0
    assert warm_start_config(demo, 4, 1e-3).optim.warmup_steps == 4  # the warm-up never outlasts the run
    # the paper budget sets the recipe's data and precision itself (the helper takes only its optimisation)
    p = paper.flat()
    assert all(p[k] == RECIPE[k] for k in RECIPE if k != "lr")
    # a budget whose recipe is only a warm-up keeps its own batch and schedule
    cpu = reproduce.BUDGETS["cpu"]
    config = reproduce.base_config(cpu, "cpu", Path("/tmp/unused"))
    warm = warm_start_config(config, cpu["warm_start_steps"], cpu["warm_start_lr"], {"warmup_steps": 6}).flat()
    base = config.flat()
    assert (warm["batch_size"], warm["schedule"], warm["warmup_steps"]) == (base["batch_size"], base["schedule"], 6)
    assert (warm["steps"], warm["lr"], warm["grad_accum"], warm["seed"]) == (64, 1e-4, 1, 0)
    assert base["schedule"] != "constant"


def test_reproduce_only_prints_the_table_of_those_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path / "cache"))
    argv = ["--budget", "smoke", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "r"), "--only", "bc:mode=sft"]
    text = reproduce.main(argv)
    assert "| SFT / SeqKD | 1 |" in text and "| warm start (no further training) | 1 |" in text
    assert (tmp_path / "r" / "results-only.md").read_text().strip() == text.strip()
    # the same runs named by a relative --out: the records are keyed by the warm start's fingerprint, not
    # its path, so nothing is trained again
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, "build_trainer", lambda *a, **k: pytest.fail("a recorded run was trained again"))
    assert reproduce.main([*argv[:-3], "r", "--only", "bc:mode=sft"]) == text
    # a store written before (keyed by the warm start's path) is re-filed, not retrained
    store = json.loads(Path("r/records.json").read_text())
    warm = json.loads(Path("r/warm-start/tdrl-warm-start.json").read_text())["fingerprint"]
    budget = {**reproduce.BUDGETS["smoke"], "steps": 2, "eval_every": 1}  # what --steps 2 makes of it
    base = reproduce.base_config(budget, "cpu", Path("r")).replace(student="r/warm-start")
    config = base.replace(agent="bc", agent_config="mode=sft", seed=0)

    def digest(values):
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    values = reproduce.record_settings(config, "mode=sft")
    assert "out" not in values and values["agent_args"] == "mode=sft"
    new, old = digest({**values, "student": f"warm-start:{warm}"}), digest(values)
    assert reproduce.run_key(config, agent_args="mode=sft") == new and new in store
    legacy = {old: store[new], "other": 1}
    assert reproduce.run_key(config, legacy, agent_args="mode=sft") == new and legacy == {new: store[new], "other": 1}
    plain = config.replace(student="tiny")  # not a warm start: the key is the settings' hash
    assert reproduce.run_key(plain, agent_args="mode=sft") == digest(reproduce.record_settings(plain, "mode=sft"))
    with pytest.raises(ValueError, match="agent_args"):  # agent settings without the spec's string: no key
        reproduce.run_key(plain)
    with pytest.raises(ValueError, match="not the config's agent settings"):
        reproduce.run_key(plain, agent_args="mode=kd")


def test_record_keys_are_those_of_tdrl_0_1():
    """records.json of earlier versions stays valid: a run's key hashes its settings by tdrl 0.1's flat
    names and plain types (agent_args the spec's string, seeds comma-separated), and these digests are
    the keys tdrl 0.1's reproduce.py gave the same settings (they change when a default of TrainConfig
    does: that invalidates the records, as it should)."""
    from tdrl.training import TrainConfig

    values = {"agent": "bc", "agent_args": "mode=sft", "teacher": "tiny", "student": "tiny", "steps": 2}
    config = TrainConfig.from_dict({**values, "eval_seeds": [0, 1], "test_seeds": [3], "eval_on_start": False})
    assert reproduce.run_key(config, agent_args="mode=sft") == "042a92f643d8b881"
    assert reproduce.run_key(TrainConfig.from_dict({"eval_on_start": False})) == "0dc798ea3b1dc9da"
    settings = reproduce.record_settings(config, "mode=sft")
    assert (settings["eval_seeds"], settings["test_seeds"], settings["test_split"]) == ("0,1", "3", "heldout")
    # the step-0 evaluation, which 0.1 never ran, makes other runs: another key
    assert reproduce.run_key(TrainConfig()) != "0dc798ea3b1dc9da"


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (pip install tdrl[lora])")
def test_bigger_students_plumbing_and_ratios():
    """Every configuration builds and steps on the tiny models (no memory processes); the table's ratios
    are against the `full` row of the same agent, and LoRA trains fewer weights than `full`."""
    from benchmarks import bigger_students

    argv = ["--teacher", "tiny", "--student", "tiny", "--agents", "bc", "--steps", "1", "--no-memory"]
    text = bigger_students.main([*argv, "--batch-size", "2", "--response-tokens", "4"])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| bc")]
    rows = {row[1].strip("`"): row for row in cells}
    assert sorted(rows) == sorted(bigger_students.CONFIGS) and rows["full"][4] == "1.00x"
    assert float(rows["lora"][2]) < float(rows["full"][2]) == float(rows["gc"][2])
    fake = {
        "teacher": "t",
        "vocab": 10,
        "student": "s",
        "shape": (2, 3),
        "tokens": 4,
        "rows": {
            "bc": {
                "full": {"step_s": 2.0, "trainable_m": 1.0, "resident_mb": 300.0, "step_peak_mb": 100.0},
                "gc": {"step_s": 3.0, "trainable_m": 1.0, "resident_mb": 300.0, "step_peak_mb": 50.0},
            }
        },
    }
    assert "| bc | `gc` | 1.00 | 3.00 | 1.50x | 300 | 50 | 0.50 | 350 | 0.88 |" in bigger_students.table(fake)
