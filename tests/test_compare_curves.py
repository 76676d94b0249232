"""The comparison's columns, legend and eval_curves.png come from tdrl.evaluation.METRICS; by hand on
made-up run summaries."""

import csv

import numpy as np
import pytest

from tdrl.compare import COLUMNS, _metric, _plot, results_table, write_results
from tdrl.evaluation import METRICS
from tdrl.training import RunSummary


def history(steps, rouge, entropy):
    return [{"step": s, "metrics": {"eval/rougeL": r, "eval/entropy": e}} for s, r, e in zip(steps, rouge, entropy)]


def summary(label, seed, hist, rouge_last=10.0, steps=4):
    test = {"last": {"eval/rougeL": rouge_last, "eval/entropy": 2.0}, "best": {"eval/rougeL": rouge_last + 1}}
    return RunSummary.from_dict(
        {
            "agent": label,
            "label": label,
            "seed": seed,
            "steps": steps,
            "wall_time_s": 1.0,
            "train_time_s": 0.5,
            "test": {**test, "best_step": 2},
            "history": hist,
            "outside_mass": 0.25,  # tdrl 0.1's summaries kept the probe at the top level: read into .probe
        }
    )


@pytest.fixture
def summaries():
    return [
        summary("start", 0, [], steps=0),  # the starting student: no history, nothing to draw
        summary("start", 1, [], steps=0),
        summary("a", 0, history([0, 2, 4], [10.0, 20.0, 30.0], [3.0, 2.0, 1.0])),
        summary("a", 1, history([0, 2], [14.0, 26.0], [5.0, 4.0])),  # shorter: cut to the common steps 0, 2
        summary("b", 0, history([0, 2, 4], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0])),
        summary("b", 1, history([0, 2, 4], [3.0, 4.0, 5.0], [2.0, 2.0, 2.0])),
        summary("b", 2, history([0, 2, 4], [2.0, 9.0, 10.0], [3.0, 3.0, 3.0])),  # 3 seeds: min..max != mean +- std
    ]


def test_the_columns_keep_todays_headers_and_order_and_come_from_the_metrics():
    assert [h for h, _ in COLUMNS] == [
        "Rouge-L last",
        "Rouge-L best-val model",
        "Rouge-L vs human, last",
        "greedy Rouge-L",
        "greedy best-val",
        "teacher NLL",
        "coverage",
        "entropy",
        "outside mass",
        "mode outside",
        "outside mass, train states",
        "mode outside, train states",
    ]
    declared = {c.header for m in METRICS for c in m.columns}
    assert declared == {h for h, _ in COLUMNS}
    run = RunSummary.from_dict(
        {
            "agent": "a",
            "seed": 0,
            "steps": 1,
            "test": {"last": {"eval/rougeL": 1.0, "eval/rougeL_greedy": 2.0}, "best": {"eval/rougeL_greedy": 3.0}},
            "probe": {"mode_outside": 0.5},
        }
    )
    got = {h: get(run) for h, get in COLUMNS}
    assert (got["Rouge-L last"], got["greedy Rouge-L"], got["greedy best-val"]) == (1.0, 2.0, 3.0)
    assert got["mode outside, train states"] == 0.5 and np.isnan(got["Rouge-L best-val model"])


def test_the_accessor_reads_every_part_of_a_summary(summaries):
    run = summaries[3]
    assert _metric(run, "last", "eval/rougeL") == 10.0 and _metric(run, "best", "eval/rougeL") == 11.0
    assert _metric(run, "probe", "outside_mass") == 0.25 and np.isnan(_metric(run, "probe", "mode_outside"))
    assert (_metric(run, "run", "label"), _metric(run, "run", "best_step")) == ("a", 2)
    assert _metric(run, "history", "eval/rougeL") == {0: 14.0, 2: 26.0}
    assert _metric(RunSummary(agent="x", seed=0, steps=0), "run", "train_time_s") == 0.0
    with pytest.raises(ValueError, match="unknown"):
        _metric(run, "final", "eval/rougeL")


def test_the_legend_is_the_shown_metrics_own_descriptions(summaries):
    text = results_table(summaries)
    by_name = {m.name: m.description for m in METRICS}
    assert f"Rouge-L last / Rouge-L best-val model: {by_name['eval/rougeL']}" in text
    assert f"entropy: {by_name['eval/entropy']}" in text
    assert "outside mass, train states: outside mass at the states of 64 training records" in text
    assert by_name["eval/teacher_nll"] not in text  # not a shown column: not in the legend
    assert "The first row is the student before any training" in text
    assert "The first row" not in results_table(summaries[2:])  # no starting-student row, no such claim


def test_eval_curves_mean_and_band_by_hand(summaries, tmp_path):
    path = tmp_path / "eval_curves.png"
    fig = _plot(summaries, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rouge, entropy = fig.axes
    assert "Rouge-L" in rouge.get_ylabel() and "entropy" in entropy.get_ylabel()
    assert "min..max" in rouge.get_legend().get_title().get_text()
    expected = {  # (axis, agent): steps, mean, min, max; a: the common steps 0, 2 of its two seeds
        (0, "a"): ([0, 2], [12.0, 23.0], [10.0, 20.0], [14.0, 26.0]),
        (0, "b"): ([0, 2, 4], [2.0, 5.0, 6.0], [1.0, 2.0, 3.0], [3.0, 9.0, 10.0]),
        (1, "a"): ([0, 2], [4.0, 3.0], [3.0, 2.0], [5.0, 4.0]),
        (1, "b"): ([0, 2, 4], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]),
    }
    for i, ax in enumerate(fig.axes):
        assert [line.get_label() for line in ax.lines] == ["a", "b"]  # "start" draws nothing
        for line, band in zip(ax.lines, ax.collections):
            steps, mean, lo, hi = expected[(i, line.get_label())]
            assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(mean)
            vertices = {tuple(v) for v in band.get_paths()[0].vertices}
            assert {(s, v) for s, v in zip(steps, lo)} <= vertices and {(s, v) for s, v in zip(steps, hi)} <= vertices
            assert all(y >= min(lo) and y <= max(hi) for _, y in vertices)


def test_write_results_files(summaries, tmp_path):
    write_results(summaries, tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["agent"], r["seed"]) for r in rows][:3] == [("start", "0"), ("start", "1"), ("a", "0")]
    assert rows[2]["Rouge-L best-val model"] == "11.0000" and rows[2]["best_step"] == "2"
    assert (tmp_path / "eval_curves.png").is_file() and "| a | 2 |" in (tmp_path / "results.md").read_text()
