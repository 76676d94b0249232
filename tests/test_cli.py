"""The command line: output of teacher-info, one-line errors with a non-zero status."""

import re

import pytest

from tdrl.cli import main


def test_python_dash_m_tdrl_is_the_command_line(monkeypatch, capsys):
    """``python -m tdrl`` (what ``accelerate launch -m tdrl ...`` runs) is ``tdrl``, exit status included."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["tdrl", "agents"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("tdrl", run_name="__main__")
    assert done.value.code == 0 and "kd-online" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["tdrl", "annotate", "--teacher", "tiny", "--out", "x", "--top-p", "2"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("tdrl", run_name="__main__")
    assert done.value.code == 2 and "top_p must lie in (0, 1]" in capsys.readouterr().err


def test_teacher_info_on_tiny_prints_sparsity(capsys):
    assert main(["teacher-info", "--teacher", "tiny", "--num-prompts", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "vocab size     512" in out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M)
    assert len(rows) == 6  # k in {64, 256} x p in {0.5, 0.8, 0.95}
    for _, p, size, mass in rows:
        assert float(size) >= 1 and float(mass) >= min(float(p), 0.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["teacher-info", "--teacher", "tiny", "--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["teacher-info", "--teacher", "tiny", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["teacher-info", "--teacher", "./missing-dir"], "does not exist here"),
        (["teacher-info", "--teacher", "tiny", "--dtype", "int3"], "unknown dtype"),
        (["teacher-info", "--teacher", "tiny", "--teacher-dtype", "int3"], "unknown dtype"),
        (["teacher-info", "--teacher", "tiny", "--teacher-device-map", "{}"], "teacher device map must be one of"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_agent_specs_keep_their_own_commas():
    from tdrl.compare import split_agent_specs

    assert split_agent_specs("kd, iqlearn:chi2=false,alpha=0.2,bd") == ["kd", "iqlearn:chi2=false,alpha=0.2", "bd"]
    assert split_agent_specs("sql:alpha=0.5,cql:cql_alpha=2,target=none") == [
        "sql:alpha=0.5",
        "cql:cql_alpha=2,target=none",
    ]


def test_docs_configuration_reference_is_the_current_one():
    """docs/reference/configuration.md's flag tables are exactly what scripts/config_table.py prints from
    TrainConfig and from every registered agent's Config."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("config_table", root / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (root / "docs" / "reference" / "configuration.md").read_text()
    assert module.config_table() in page, "rerun python scripts/config_table.py into docs/reference/configuration.md"
    assert module.agent_tables() in page, "rerun python scripts/config_table.py into docs/reference/configuration.md"
    assert "| `--expert-term` | `topp_mean` |" in module.agent_tables()  # bd's own default, from its Config
    assert "| `--eval-every` | `50` |" in module.config_table()  # a group's leaf, under its flag name
    metrics_page = (root / "docs" / "reference" / "metrics.md").read_text()
    assert module.eval_metric_table() in metrics_page, "rerun python scripts/config_table.py into metrics.md"
    assert "`eval/rougeL_greedy`" in module.eval_metric_table()  # every metric of tdrl.evaluation.METRICS


def test_docs_metric_names_are_what_each_agent_logs():
    """docs/reference/metrics.md's agent table names exactly the metrics each built-in agent returns
    (besides the diagnostics every agent logs: policy/outside_mass, policy/entropy, policy/mode_outside)."""
    import re
    from pathlib import Path

    from tdrl.agents import get_agent, list_agents
    from tdrl.testing.agent_contract import _agent, contract_batch

    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "metrics.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z-]+)` \|.*\| ([^|]*)\|$", page, re.M)}
    diagnostics = {"policy/outside_mass", "policy/entropy", "policy/mode_outside"}

    def documented(name: str) -> set[str]:
        cell = rows[name].strip()
        names = set(re.findall(r"`([a-z_]+/[a-z0-9_]+)`", cell))
        ref = re.match(r"(?:as ([a-z-]+)|([a-z-]+)'s)", cell)  # "as iqlearn", "sql's + ..."
        return names | documented(ref.group(1) or ref.group(2)) if ref else names

    for name in (n for n in list_agents() if get_agent(n).__module__.startswith("tdrl.")):
        agent = _agent(name)  # the kit's agent has the kit's teacher (kd-online needs one)
        _, metrics = agent(contract_batch(), diagnostics=True)
        assert set(metrics) - diagnostics == documented(name), (name, sorted(set(metrics) - diagnostics))
