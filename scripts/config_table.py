"""Print the README's configuration reference: one row per TrainConfig field (flag, default, help).

python scripts/config_table.py        # tests/test_cli.py checks the README holds exactly this table
"""

from __future__ import annotations

import dataclasses

from tdrl.config import TrainConfig


def config_table() -> str:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        shown = "agent's preset" if f.default is None else '`""`' if f.default == "" else f"`{f.default}`"
        lines.append(f"| `--{f.name.replace('_', '-')}` | {shown} | {f.metadata['help']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_table())
