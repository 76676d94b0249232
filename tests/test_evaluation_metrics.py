"""Evaluation as a list of metrics: the refactor reproduces the old hand-written ``evaluate`` exactly,
and a metric added by a user is computed beside the built-in ones."""

import pytest
import torch

from tdrl.evaluation import EvalConfig, evaluate, reference_records
from tdrl.testing import tiny_teacher


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """The tiny teacher; two students made from it (``soft``: its head x 0.7; ``noisy``: the same plus
    seeded noise on the blocks, so its samples leave A_p(s) and its greedy answers differ); 4 bundled
    prompts with the teacher's greedy references, hand-set short answers and human references."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TDRL_CACHE", str(tmp_path_factory.mktemp("cache")))
    teacher = tiny_teacher()
    students = {}
    for name, noise in [("noisy", 0.005), ("soft", 0.0)]:
        model = tiny_teacher().model
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.startswith("transformer.h."):
                    p.add_(noise * torch.randn(p.shape, generator=gen))
            model.lm_head.weight.mul_(0.7)
        students[name] = model
    records = reference_records(teacher, "bundled", n=4, max_new_tokens=8)
    mp.undo()
    for rec, answer, human in zip(records, ["o", "e", None, "x"], ["ides ment os", None, "v valuele row pl", "this"]):
        rec.pop("answer")
        if answer:
            rec["answer"] = answer
        if human:
            rec["human_reference"] = human
    plain = [{"prompt": r["prompt"], "reference_response": r["reference_response"]} for r in records]
    return teacher, students, records, plain


SAMPLED = dict(max_new_tokens=8, seeds=[0, 1], top_p=0.9, temperature=0.9, also_greedy=True, samples=2)

# Computed with the OLD tdrl.evaluation.evaluate (one hand-written function, before the METRICS list;
# commit 6c953a2) on exactly this fixture; the refactor must reproduce every number to 1e-9.
OLD = {
    "noisy_sampled": {
        "eval/rougeL": 9.166666666666666,
        "eval/rougeL_std": 0.8333333333333339,
        "eval/teacher_nll": 2.799324855208397,
        "eval/teacher_nll_std": 0.22565610706806183,
        "eval/coverage": 0.84375,
        "eval/coverage_std": 0.03125,
        "eval/length": 8.0,
        "eval/length_std": 0.0,
        "eval/terminated": 0.0,
        "eval/terminated_std": 0.0,
        "eval/entropy": 2.784578323364258,
        "eval/entropy_std": 0.10557693243026733,
        "eval/outside_mass": 0.2960217874497175,
        "eval/outside_mass_std": 0.03260808624327183,
        "eval/mode_outside": 0.078125,
        "eval/mode_outside_std": 0.078125,
        "eval/answer_match": 0.5,
        "eval/answer_match_std": 0.16666666666666666,
        "eval/rougeL_reference": 5.5555555555555545,
        "eval/rougeL_reference_std": 5.5555555555555545,
        "eval/rougeL_greedy": 0.0,
        "eval/rougeL_greedy_std": 0.0,
    },
    "soft_greedy": {
        "eval/rougeL": 100.0,
        "eval/rougeL_std": 0.0,
        "eval/teacher_nll": 1.3758124709129333,
        "eval/teacher_nll_std": 0.0,
        "eval/coverage": 1.0,
        "eval/coverage_std": 0.0,
        "eval/length": 8.0,
        "eval/length_std": 0.0,
        "eval/terminated": 0.0,
        "eval/terminated_std": 0.0,
        "eval/entropy": 3.4715409874916077,
        "eval/entropy_std": 0.0,
        "eval/outside_mass": 0.27997320890426636,
        "eval/outside_mass_std": 0.0,
        "eval/mode_outside": 0.0,
        "eval/mode_outside_std": 0.0,
        "eval/answer_match": 0.6666666666666666,
        "eval/answer_match_std": 0.0,
        "eval/rougeL_reference": 79.62962962962963,
        "eval/rougeL_reference_std": 0.0,
    },
    "soft_plain": {
        "eval/rougeL": 12.5,
        "eval/rougeL_std": 6.25,
        "eval/teacher_nll": 3.4067488312721252,
        "eval/teacher_nll_std": 0.008775055408477783,
        "eval/coverage": 0.71875,
        "eval/coverage_std": 0.0625,
        "eval/length": 8.0,
        "eval/length_std": 0.0,
        "eval/terminated": 0.0,
        "eval/terminated_std": 0.0,
        "eval/entropy": 3.7604760825634003,
        "eval/entropy_std": 0.08397415280342102,
        "eval/outside_mass": 0.35983699932694435,
        "eval/outside_mass_std": 0.004505399614572525,
        "eval/mode_outside": 0.0,
        "eval/mode_outside_std": 0.0,
        "eval/rougeL_greedy": 100.0,
        "eval/rougeL_greedy_std": 0.0,
    },
}
OLD_SAMPLES = {  # the student texts of the first seed's first ``samples`` records, same provenance
    "noisy_sampled": ["\x16\ufffd\ufffd\ufffdar pl\ufffdos", "\ufffd yo\x12\ufffdagus\ufffd"],
    "soft_greedy": [
        "\ufffdides\ufffdment\ufffd\ufffdos",
        "\x7fion plarote\ufffdir\ufffd",
        "v valuele}row\ufffdpl scho",
    ],
    "soft_plain": ["larg\nion pl\u037b\ufffdon", "\x7fionftagreuts\ufffd"],
}


def run_case(fixture, case):
    teacher, students, records, plain = fixture
    if case == "noisy_sampled":
        config = EvalConfig(**SAMPLED)
        return evaluate(students["noisy"], teacher.tokenizer, teacher, records, config, decode_temperature=0.8)
    if case == "soft_greedy":
        config = EvalConfig(max_new_tokens=8, greedy=True, also_greedy=True)
        return evaluate(students["soft"], teacher.tokenizer, teacher, records, config, decode_temperature=0.8)
    return evaluate(students["soft"], teacher.tokenizer, teacher, plain, EvalConfig(**SAMPLED))


@pytest.mark.parametrize("case", list(OLD))
def test_every_metric_reproduces_the_old_hand_written_evaluation(fixture, case):
    metrics, samples = run_case(fixture, case)
    old = OLD[case]
    assert {k: metrics[k] for k in old} == pytest.approx(old, abs=1e-9, rel=0)
    # no other metric of the sampled seeds appears (greedy-pass extras carry the _greedy suffix)
    assert all(k in old or "_greedy" in k for k in metrics), sorted(set(metrics) - set(old))
    assert [s["student"] for s in samples] == OLD_SAMPLES[case]
    records = fixture[2]
    assert [s["teacher"] for s in samples] == [r["reference_response"] for r in records[: len(samples)]]


def test_the_greedy_pass_metrics_are_those_of_a_greedy_only_evaluation(fixture):
    """``*_greedy`` reads the greedy pass, not a sampled seed: each equals its sampled-name metric of a
    greedy-only evaluation (the same one greedy decoding)."""
    teacher, students, records, _ = fixture
    both, _ = run_case(fixture, "noisy_sampled")
    config = EvalConfig(max_new_tokens=8, greedy=True)
    greedy, _ = evaluate(students["noisy"], teacher.tokenizer, teacher, records, config, decode_temperature=0.8)
    for name in ("eval/rougeL", "eval/rougeL_reference", "eval/answer_match"):
        assert both[f"{name}_greedy"] == greedy[name]
        assert both[f"{name}_greedy_std"] == 0.0
    assert both["eval/answer_match_greedy"] != both["eval/answer_match"]  # the fixture tells the passes apart


def test_a_users_metric_is_computed_beside_the_built_in_ones_and_may_not_apply(fixture):
    from tdrl.evaluation import METRICS, Metric

    teacher, students, records, _ = fixture
    longest = Metric("eval/longest", "the longest response (tokens)", lambda g: max(map(len, g.responses)))
    never = Metric("eval/never", "applies to nothing", lambda g: None)
    first = Metric("eval/first_token", "the first response's first token id", lambda g: g.responses[0][0])
    config = EvalConfig(max_new_tokens=5, seeds=[0, 1])
    metrics, _ = evaluate(
        students["noisy"],
        teacher.tokenizer,
        teacher,
        records,
        config,
        metrics=METRICS + [longest, never, first.on_greedy()],
    )
    assert metrics["eval/longest"] == 5.0 and metrics["eval/longest_std"] == 0.0
    assert "eval/never" not in metrics and "eval/first_token_greedy" not in metrics  # no also_greedy: no pass
    only, _ = evaluate(students["noisy"], teacher.tokenizer, teacher, records, config, metrics=[first, longest])
    assert set(only) == {"eval/first_token", "eval/first_token_std", "eval/longest", "eval/longest_std"}


def test_the_evaluator_wraps_once_and_scores_the_current_weights_or_another_model(fixture, monkeypatch):
    import copy

    from tdrl.evaluation import Evaluator

    teacher, students, records, _ = fixture
    model = copy.deepcopy(students["soft"])
    config = EvalConfig(max_new_tokens=6, seeds=[0, 1], samples=1)
    wraps = []
    original = Evaluator._wrap
    monkeypatch.setattr(Evaluator, "_wrap", lambda self, m: wraps.append((self, m)) or original(self, m))
    evaluator = Evaluator(model, teacher.tokenizer, teacher, records, config)
    before, samples = evaluator.run()
    assert before == evaluate(copy.deepcopy(model), teacher.tokenizer, teacher, records, config)[0]
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # training moves the weights in place: the next run sees them
    after, _ = evaluator.run()
    assert after == evaluate(copy.deepcopy(model), teacher.tokenizer, teacher, records, config)[0]
    assert after["eval/entropy"] > before["eval/entropy"]
    other, _ = evaluator.run(model=students["noisy"], seeds=[3], also_greedy=True)
    assert (
        other
        == evaluate(
            students["noisy"],
            teacher.tokenizer,
            teacher,
            records,
            EvalConfig(max_new_tokens=6, seeds=[3], also_greedy=True),
        )[0]
    )
    mine = [m for owner, m in wraps if owner is evaluator]
    assert len(mine) == 2 and mine[0] is model and mine[1] is students["noisy"]  # at construction; the other model
    assert len(samples) == 1
    model.train()
    evaluator.run(seeds=[0])
    assert model.training  # evaluated in eval mode, then given back in training mode


def test_bad_records_and_repeated_metric_names_are_typed_errors(fixture):
    from tdrl.errors import ConfigError, DataError
    from tdrl.evaluation import METRICS, Column, Evaluator, Metric

    teacher, students, _, _ = fixture
    with pytest.raises(DataError, match="no evaluation records"):
        Evaluator(students["soft"], teacher.tokenizer, teacher, [])
    with pytest.raises(DataError, match="reference_records"):
        Evaluator(students["soft"], teacher.tokenizer, teacher, [{"prompt": "hi"}])
    with pytest.raises(ConfigError, match="repeat"):
        Evaluator(
            students["soft"],
            teacher.tokenizer,
            teacher,
            [{"prompt": "a", "reference_response": "b"}],
            metrics=METRICS + METRICS[:1],
        )
    with pytest.raises(ConfigError, match="generation"):
        Metric("eval/x", "x", len, generation="beam")
    with pytest.raises(ConfigError, match="'last', 'best' or 'probe'"):
        Metric("eval/x", "x", len, columns=(Column("x", "first"),))


def test_the_docs_and_the_metric_table_are_generated_from_the_list():
    import importlib.util
    from pathlib import Path

    import tdrl.evaluation
    from tdrl.evaluation import METRICS

    path = Path(__file__).resolve().parents[1] / "scripts" / "config_table.py"
    spec = importlib.util.spec_from_file_location("config_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.eval_metric_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{m.name}`" for m in METRICS]
    assert "one extra greedy pass" in rows[[m.name for m in METRICS].index("eval/rougeL_greedy")]
    for m in METRICS:
        assert f"``{m.name}`` ({m.generation}): {m.description}." in tdrl.evaluation.__doc__
