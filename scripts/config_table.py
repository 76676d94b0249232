"""Print the reference tables of docs/reference/: one table per TrainConfig group, one row per setting
(flag, default, range: the range or choices its field declares, help), then the settings every agent
shares and each agent's own (its typed flags, `tdrl train --agent X`) for configuration.md, then the
evaluation metrics (`tdrl.evaluation.METRICS`: name, meaning, which decoding pass) for metrics.md.

python scripts/config_table.py           # print them
python scripts/config_table.py --write   # rewrite the marked sections of those pages (tests/test_cli.py
                                         # checks the pages hold exactly this text)
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from tdrl.agents import AgentConfig, get_agent, list_agents
from tdrl.errors import field_limits
from tdrl.evaluation import METRICS
from tdrl.training.config import GROUPS, TrainConfig, config_leaves

PRESETS = ("online_every", "online_ratio", "lm_coef")


def _default(f: dataclasses.Field, flag: str) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return "agent's preset" if flag in PRESETS else "unset"
    if isinstance(value, list):
        value = " ".join(map(str, value))
    return '`""`' if value == "" else f"`{value}`"


def _values(cls: type, f: dataclasses.Field) -> str:
    """The range column: the declared range (``each in`` for a list), the choices, or nothing."""
    _, limits, choices, _ = field_limits(cls, f.name)
    if choices is not None:
        return ", ".join(f"`{c}`" for c in choices)
    if limits is None:
        return ""
    listed = "list" in str(typing.get_type_hints(cls)[f.name])
    return f"{'each in ' if listed else ''}`{limits}`"


def _rows(cls: type, fields_and_flags) -> list[str]:
    lines = ["| flag | default | range | meaning |", "|---|---|---|---|"]
    for f, flag in fields_and_flags:
        meaning = f.metadata.get("help", "").replace("|", "\\|")  # a | inside a cell would end it
        lines.append(f"| `--{flag.replace('_', '-')}` | {_default(f, flag)} | {_values(cls, f)} | {meaning} |")
    return lines


def config_table() -> str:
    """Per group of TrainConfig (the run's own settings first), a table of its flags."""
    out = ["Run (`TrainConfig`):", ""]
    leaves = [(f, flag) for group, f, flag in config_leaves() if group is None and f.name != "agent_config"]
    out += _rows(TrainConfig, leaves)
    for name, cls in GROUPS.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        out += ["", f"`{name}` (`{cls.__name__}`): {doc}", ""]
        out += _rows(cls, [(f, flag) for group, f, flag in config_leaves() if group == name])
    return "\n".join(out)


def agent_tables() -> str:
    """The shared agent settings, then per agent its own fields and the shared ones it presets."""
    shared = {f.name for f in dataclasses.fields(AgentConfig)}
    out = ["Every agent (`AgentConfig`):", ""]
    out += _rows(AgentConfig, ((f, f.name) for f in dataclasses.fields(AgentConfig)))
    for name in list_agents():
        cls = get_agent(name)
        if not cls.__module__.startswith("tdrl."):
            continue  # a plug-in registered in this process (tests import examples/) is not tdrl's to document
        fields = dataclasses.fields(cls.Config)
        own = [f for f in fields if f.name not in shared]
        preset = {
            f.name: f.default
            for f in fields
            if f.name in shared and f.default != AgentConfig.__dataclass_fields__[f.name].default
        }
        presets = ", ".join(f"`{k}` = `{v}`" for k, v in preset.items())
        out += ["", f"`{name}` (`{cls.Config.__name__}`){': presets ' + presets if presets else ''}", ""]
        out += _rows(cls.Config, ((f, f.name) for f in own)) if own else ["no settings of its own"]
    return "\n".join(out)


#: Which decoding pass a metric reads, in words.
PASSES = {
    "sampled": "each sampling seed (mean, `_std` over seeds); greedy decoding's one pass with `--eval-greedy`",
    "greedy": "one extra greedy pass (`--eval-also-greedy`; the test evaluation and `tdrl eval` make it)",
}


def eval_metric_table() -> str:
    """One row per evaluation metric: its TensorBoard / summary name, what it measures, which pass it reads."""
    lines = ["| metric | meaning | generation |", "|---|---|---|"]
    for m in METRICS:
        meaning = m.description.replace("|", "\\|")
        lines.append(f"| `{m.name}` | {meaning} | {PASSES[m.generation]} |")
    return "\n".join(lines)


#: page -> the generators whose output it holds between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``
PAGES = {
    "docs/reference/configuration.md": ("config_table", "agent_tables"),
    "docs/reference/metrics.md": ("eval_metric_table",),
}


def write_pages(root: Path) -> None:
    """Replace each marked section of the reference pages with its generator's output."""
    for page, names in PAGES.items():
        path = root / page
        text = path.read_text()
        for name in names:
            start, end = f"<!-- generated: {name} -->\n", "\n<!-- /generated -->"
            a = text.index(start) + len(start)
            b = text.index(end, a)
            text = text[:a] + globals()[name]() + text[b:]
        path.write_text(text)


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_pages(Path(__file__).resolve().parents[1])
        sys.exit(0)
    print(config_table())
    print()
    print(agent_tables())
    print()
    print(eval_metric_table())
