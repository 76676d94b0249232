"""The comparison table's separations: by hand on made-up summaries."""

from tdrl.compare import results_table, separations
from tdrl.training import RunSummary, TestResult


def run(label, rouge):
    test = TestResult(last={"eval/rougeL": rouge}, best={"eval/rougeL": rouge})
    return RunSummary(agent=label, label=label, seed=0, steps=1, test=test)


def test_separations_by_hand():
    # a: 10 +- 1 (values 9, 11), b: 14 +- 1 (13, 15): |10 - 14| = 4 > 1 + 1, separated;
    # c: 11.5 +- 0.5 (11, 12): |10 - 11.5| = 1.5 <= 1.5, not separated; |14 - 11.5| = 2.5 > 1.5, separated
    runs = [run("a", 9.0), run("a", 11.0), run("b", 13.0), run("b", 15.0), run("c", 11.0), run("c", 12.0)]
    assert separations(runs) == ["b > a (14.00 vs 10.00)", "b > c (14.00 vs 11.50)"]


def test_a_single_seed_has_no_spread_and_takes_no_part():
    # one run of "d" lies 0.1 above a two-seed group with std 0: its std is unknown, not 0
    runs = [run("a", 10.0), run("a", 10.0), run("d", 10.1), run("e", 50.0)]
    assert separations(runs) == []
    assert "no pair" in results_table(runs)
    assert separations(runs + [run("d", 10.1)]) == ["d > a (10.10 vs 10.00)"]
