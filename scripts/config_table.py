"""Print the configuration reference of docs/reference/configuration.md: one row per TrainConfig field
(flag, default, help), then the settings every agent shares and each agent's own (its typed flags,
`tdrl train --agent X`).

python scripts/config_table.py        # tests/test_cli.py checks that docs page holds exactly this text
"""

from __future__ import annotations

import dataclasses

from tdrl.agents import AgentConfig, get_agent, list_agents
from tdrl.training.args import TrainConfig


def _default(f: dataclasses.Field, value=dataclasses.MISSING) -> str:
    value = f.default if value is dataclasses.MISSING else value
    if value is None:
        return "agent's preset" if f.name in ("online_every", "online_ratio", "lm_coef") else "`None`"
    return '`""`' if value == "" else f"`{value}`"


def _rows(fields, defaults=None) -> list[str]:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields:
        shown = _default(f, (defaults or {}).get(f.name, dataclasses.MISSING))
        meaning = f.metadata.get("help", "").replace("|", "\\|")  # a | inside a cell would end it
        lines.append(f"| `--{f.name.replace('_', '-')}` | {shown} | {meaning} |")
    return lines


def config_table() -> str:
    return "\n".join(_rows(dataclasses.fields(TrainConfig)))


def agent_tables() -> str:
    """The shared agent settings, then per agent its own fields and the shared ones it presets."""
    shared = {f.name for f in dataclasses.fields(AgentConfig)}
    out = ["Every agent (`AgentConfig`):", "", *_rows(dataclasses.fields(AgentConfig))]
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
        out += _rows(own) if own else ["no settings of its own"]
    return "\n".join(out)


if __name__ == "__main__":
    print(config_table())
    print()
    print(agent_tables())
