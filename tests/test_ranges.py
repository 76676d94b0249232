"""The valid values of every setting: one declaration on the dataclass field (``hp(..., range=...)`` /
``choices=``), checked when the config is built, printed by ``--help`` and the configuration reference.
Every agent Config, every trainer group, TrainConfig and EvalConfig is walked: each declared bound is
tried just outside (refused, naming the setting and the range) and on it (accepted when closed)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

import pytest

from tdrl.agents import AgentConfig, get_agent, hp, list_agents
from tdrl.errors import SEED_RANGE, ConfigError, Range, field_limits
from tdrl.evaluation import EvalConfig
from tdrl.training.config import GROUPS, TrainConfig
from tdrl.training.groups import flag_of

# ---------------------------------------------------------------------- the spec parser


@pytest.mark.parametrize(
    "spec, lo, hi, lo_open, hi_open, shown",
    [
        (">= 1", 1, math.inf, False, True, "[1, inf)"),
        ("> 0", 0, math.inf, True, True, "(0, inf)"),
        (">= 0", 0, math.inf, False, True, "[0, inf)"),
        ("< 0", -math.inf, 0, True, True, "(-inf, 0)"),
        ("<= 2.5", -math.inf, 2.5, True, False, "(-inf, 2.5]"),
        ("[0, 1)", 0, 1, False, True, "[0, 1)"),
        ("(0, 1]", 0, 1, True, False, "(0, 1]"),
        ("[0,1]", 0, 1, False, False, "[0, 1]"),
        ("(0, 1)", 0, 1, True, True, "(0, 1)"),
        ("[0, 2**31)", 0, 2**31, False, True, "[0, 2**31)"),
        ("(-inf, 0)", -math.inf, 0, True, True, "(-inf, 0)"),
        ("(1e-3, inf)", 0.001, math.inf, True, True, "(0.001, inf)"),
    ],
)
def test_a_spec_parses_to_its_interval_and_prints_as_one(spec, lo, hi, lo_open, hi_open, shown):
    r = Range.parse(spec)
    assert (r.lo, r.hi, r.lo_open, r.hi_open) == (lo, hi, lo_open, hi_open)
    assert str(r) == shown and Range.parse(shown) == r  # the printed form parses back to the same range


def test_membership_at_open_and_closed_ends():
    unit = Range.parse("(0, 1]")
    assert 1 in unit and 1.0 in unit and 0.5 in unit
    assert 0 not in unit and 1.0000001 not in unit and math.nan not in unit
    assert True not in Range.parse(">= 0") and "1" not in Range.parse(">= 0")  # numbers only
    assert 2**31 - 1 in SEED_RANGE and 2**31 not in SEED_RANGE and -1 not in SEED_RANGE
    with pytest.raises(ConfigError, match=r"^--x must lie in \(0, 1\], got 0 \(why not\)$"):
        unit.check(0, "--x", "why not")
    with pytest.raises(ConfigError, match=r"^seeds must lie in \[0, 2\*\*31\), got \[0, -1\]$"):
        SEED_RANGE.check([0, -1], "seeds")  # a list: each element


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "0..1",
        "=> 1",
        ">= x",
        "[0, inf]",
        "[-inf, 0)",
        "(1, 0)",
        "[1, 1)",
        "(0 1)",
        "[nan, 1]",
        ">= 2.0**3",
        ">= 1,",
    ],
)
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match="range"):
        Range.parse(spec)


def test_a_bad_declaration_fails_when_the_class_is_defined():
    with pytest.raises(ValueError, match="range"):

        @dataclass
        class Malformed(AgentConfig):
            weight: float = hp(1.0, "w", range="at least one")

    with pytest.raises(ValueError, match="outside its own range"):

        @dataclass
        class DefaultOutside(AgentConfig):
            weight: float = hp(-1.0, "w", range=">= 0")

    with pytest.raises(ValueError, match="not one of its choices"):

        @dataclass
        class DefaultNotAChoice(AgentConfig):
            mode: str = hp("c", "m", choices=("a", "b"))

    with pytest.raises(ValueError, match="needs a why"):
        hp(1.0, "w", range=None)  # opting out of a range takes a reason
    with pytest.raises(ValueError, match="not both"):
        hp("a", "m", range=">= 0", choices=("a",))
    with pytest.raises(ValueError, match="choices"):
        hp("a", "m", choices="ab")  # a string is not a tuple of choices
    assert field_limits(_unbounded_config(), "drift")[:2] == (True, None)  # declared unbounded, with its why


def _unbounded_config() -> type:
    @dataclass
    class Unbounded(AgentConfig):
        drift: float = hp(0.0, "a shift of any sign", range=None, why="a shift: any real number")

    return Unbounded


# ---------------------------------------------------------------------- every config, every field


def configs() -> list[tuple[str, type]]:
    """Every registered agent's Config (plug-ins registered in this process too), the trainer's groups,
    TrainConfig and the evaluation's EvalConfig."""
    out = {f"agent {name}": get_agent(name).Config for name in list_agents()}
    out.update({f"group {name}": cls for name, cls in GROUPS.items()})
    out.update({"TrainConfig": TrainConfig, "EvalConfig": EvalConfig})
    return sorted(out.items())


def kind(cls: type, name: str) -> tuple[type | None, bool]:
    """(int, float, str or None for anything else, whether it is a list) of a field's annotation."""
    hint = typing.get_type_hints(cls)[name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is list:
            return typing.get_args(option)[0], True
    for base in (bool, int, float, str):
        if base in options:
            return (None if base is bool else base), False
    return None, False


def shown_name(cls: type, name: str) -> str:
    """How an error names the field: the trainer's by flag (``--eval-top-p``), others by field name."""
    return flag_of(cls, name) if cls is TrainConfig or cls in GROUPS.values() else name


def build(cls: type, name: str, value, listed: bool):
    return cls(**{name: [value] if listed else value})


def neighbours(end, base: type, towards: float):
    """The nearest value of the field's type past ``end`` in the direction ``towards`` (+-inf)."""
    if base is int:
        return int(end) + (1 if towards > 0 else -1)
    return math.nextafter(float(end), towards)


def test_every_number_declares_its_range_and_only_numbers_do():
    """A new setting cannot forget its range: every int / float field (a list of ints: each seed) of
    every config declares one, or declares itself unbounded with a reason; choices go on strings."""
    missing, misplaced = [], []
    for where, cls in configs():
        for f in dataclasses.fields(cls):
            declared, limits, choices, why = field_limits(cls, f.name)
            base, _ = kind(cls, f.name)
            if base in (int, float) and not declared:
                missing.append(f"{where}: {f.name}")
            if base in (int, float) and declared and limits is None and not why:
                missing.append(f"{where}: {f.name} (range=None without a why)")
            if (limits is not None and base not in (int, float)) or (choices is not None and base is not str):
                misplaced.append(f"{where}: {f.name}")
    assert not missing, f"declare hp(..., range=...) on: {missing}"
    assert not misplaced, misplaced


def test_every_declared_bound_is_refused_just_outside_and_accepted_on_it():
    checked = 0
    for where, cls in configs():
        for f in dataclasses.fields(cls):
            _, limits, choices, _ = field_limits(cls, f.name)
            base, listed = kind(cls, f.name)
            name = shown_name(cls, f.name)
            if choices is not None:
                with pytest.raises(ConfigError, match=f"^{name} must be one of {', '.join(choices)}, got 'bogus'"):
                    build(cls, f.name, "bogus", listed)
                for choice in choices:
                    assert getattr(build(cls, f.name, choice, listed), f.name) == choice, (where, f.name)
                checked += 1
            if limits is None:
                continue
            for end, is_open, outward in (
                (limits.lo, limits.lo_open, -math.inf),
                (limits.hi, limits.hi_open, math.inf),
            ):
                if math.isinf(end):
                    continue
                outside = base(end) if is_open else neighbours(end, base, outward)
                prefix = f"{name} must lie in {limits}, got "
                with pytest.raises(ConfigError) as refused:
                    build(cls, f.name, outside, listed)
                assert str(refused.value).startswith(prefix), (where, f.name, outside, str(refused.value))
                inside = neighbours(end, base, -outward) if is_open else base(end)
                built = build(cls, f.name, inside, listed)  # on a closed end, or just inside an open one
                assert getattr(built, f.name) == ([inside] if listed else inside), (where, f.name, inside)
                checked += 1
    assert checked > 60  # every config was walked, not an empty list


def test_the_ranges_that_matter_are_the_declared_ones():
    """Spot checks that the walk reads the real ranges (and that a redeclared field keeps its base's)."""
    assert str(field_limits(get_agent("bd").Config, "top_p")[1]) == "(0, 1]"  # BDConfig redeclares top_p
    assert field_limits(get_agent("bd").Config, "expert_term")[2] == ("token", "topp_mean")
    assert str(field_limits(get_agent("iql").Config, "head_lr_scale")[1]) == "(0, inf)"
    assert str(field_limits(AgentConfig, "gamma")[1]) == "[0, 1]"
    assert str(field_limits(GROUPS["eval"], "seeds")[1]) == str(SEED_RANGE) == "[0, 2**31)"
    assert str(field_limits(GROUPS["optim"], "adam_beta2")[1]) == "[0, 1)"
    assert get_agent("iql").Config(head_lr_scale=1.0).head_lr_scale == 1.0
    with pytest.raises(ConfigError, match=r"^tau must lie in \(0, 1\], got 5.0$"):
        get_agent("iql").Config(tau=5)
    with pytest.raises(ConfigError, match=r"^--eval-temperature must lie in \(0, inf\), got 0.0"):
        TrainConfig.from_dict({"eval_temperature": 0})
    assert TrainConfig.from_dict({"online_ratio": None}).online.ratio is None  # unset: not checked
    with pytest.raises(ConfigError, match=r"--eval-seeds must lie in \[0, 2\*\*31\), got \[0, -1\]"):
        TrainConfig.from_dict({"eval_seeds": [0, -1]})


def test_a_plug_in_config_is_checked_by_the_same_mechanism():
    @dataclass
    class PlugConfig(AgentConfig):
        weight: float = hp(1.0, "w", range="(0, 1]")
        gamma: float = hp(0.5, "a new default; the range stays AgentConfig's")

    assert PlugConfig(weight=1.0).weight == 1.0
    with pytest.raises(ConfigError, match=r"^weight must lie in \(0, 1\], got 0.0$"):
        PlugConfig(weight=0.0)
    with pytest.raises(ConfigError, match=r"^gamma must lie in \[0, 1\], got 2.0$"):
        PlugConfig(gamma=2.0)


# ---------------------------------------------------------------------- the command line


def test_help_prints_each_settings_range_and_choices(capsys):
    from tdrl.cli import main

    assert main(["train", "--agent", "sql", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "Polyak rate of the target network (range: (0, 1]) (default: 0.01)" in text
    assert "--target {polyak,none}" in text and "--restrict {mdp,set,none}" in text
    assert "--mixed-precision {no,bf16,fp16}" in text
    assert "(range: each in [0, 2**31)) (default: 0)" in text  # --eval-seeds
    assert "(range: [0, 1)) (default: 0.95)" in text  # --adam-beta2
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(range: each in [0, 2**31))" in text and "(range: (0, inf))" in text


@pytest.mark.parametrize(
    "seeds, needle",
    [
        (["5", "5"], "--seeds repeats a seed ([5, 5])"),
        (["-1"], "--seeds must lie in [0, 2**31), got [-1]"),
        (["0", str(2**31)], "--seeds must lie in [0, 2**31)"),
    ],
)
def test_eval_seeds_follow_the_rule_of_eval_seeds(seeds, needle, tmp_path, capsys):
    """Checked before anything loads (the checkpoint need not even exist): one line, status 2."""
    from tdrl.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--seeds", *seeds]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tdrl: ") and err.count("\n") == 1 and needle in err, err


def test_eval_decoding_flags_are_checked_against_evalconfig_first(tmp_path, capsys):
    from tdrl.cli import main

    base = ["eval", "--checkpoint", str(tmp_path / "nothing")]
    assert main([*base, "--temperature", "0"]) == 2
    err = capsys.readouterr().err
    assert "--temperature must lie in (0, inf), got 0.0 (--greedy decodes greedily)" in err and err.count("\n") == 1
    assert main([*base, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must lie in [1, inf), got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^seeds repeats a seed"):
        EvalConfig(seeds=[1, 1])  # the library's EvalConfig: the same rule


def test_a_negative_power_is_negative():
    from tdrl.errors import Range

    assert Range.parse("[-2**4, 0)").lo == -16 and Range.parse("(-inf, 2**3]").hi == 8
