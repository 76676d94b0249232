"""The bundled splits test generalisation: no template group and no near-duplicate crosses them, and
the held-out split follows no bundled template. Everything is recomputed here from the prompts (brute
force over every cross-split pair), not read from the stored ``group`` field."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from tdrl.data import SPLITS, load_source

TEMPLATE_SPLITS = ("train", "validation", "test")


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b)


@pytest.fixture(scope="module")
def bundled():
    return {s: load_source("bundled", split=s).to_list() for s in SPLITS}


def test_no_family_answer_group_crosses_splits(bundled):
    where = defaultdict(set)
    for split in TEMPLATE_SPLITS:
        for r in bundled[split]:
            if r.get("reference"):
                where[(r["family"], r["reference"])].add(split)
    assert len(where) > 100  # the check is not vacuous: many answer groups
    crossing = {k: v for k, v in where.items() if len(v) > 1}
    assert not crossing, f"{len(crossing)} (family, answer) groups cross splits, e.g. {list(crossing.items())[:3]}"


def test_no_stored_group_crosses_splits():
    """The generator's own groups (slot fillers joined with answers) stay whole too."""
    import json
    from importlib import resources

    text = resources.files("tdrl").joinpath("resources", "bundled_prompts.jsonl").read_text(encoding="utf-8")
    where = defaultdict(set)
    for record in map(json.loads, text.splitlines()):
        where[record["group"]].add(record["split"])
    assert len(where) > 300 and all(len(v) == 1 for v in where.values())


def test_no_near_duplicate_prompt_crosses_splits(bundled):
    """Brute force over every pair of prompts in two different template splits: word-set Jaccard < 0.8."""
    sets = {s: [words(r["prompt"]) for r in bundled[s]] for s in TEMPLATE_SPLITS}
    worst = 0.0
    for i, a in enumerate(TEMPLATE_SPLITS):
        for b in TEMPLATE_SPLITS[i + 1 :]:
            for x in sets[a]:
                for y in sets[b]:
                    worst = max(worst, jaccard(x, y))
    assert 0.5 < worst < 0.8, worst  # > 0.5: the splits do share templates (what heldout is for)


def test_template_splits_are_usable(bundled):
    sizes = Counter({s: len(bundled[s]) for s in TEMPLATE_SPLITS})
    total = sum(sizes.values())
    assert total >= 2000 and sizes["train"] >= 0.8 * total
    assert sizes["validation"] > 150 and sizes["test"] > 150
    for split in ("validation", "test"):  # every family is still represented
        assert len({r["family"] for r in bundled[split]}) == len({r["family"] for r in bundled["train"]})


def test_heldout_prompts_follow_no_bundled_template(bundled):
    heldout = bundled["heldout"]
    assert len(heldout) >= 300
    assert len({r["prompt"] for r in heldout}) == len(heldout) == len({r["id"] for r in heldout})
    assert sum(1 for r in heldout if r.get("reference")) >= 150
    assert len({r["family"] for r in heldout}) >= 8
    assert not {r["family"] for r in heldout} & {r["family"] for r in bundled["train"]}
    template = [words(r["prompt"]) for s in TEMPLATE_SPLITS for r in bundled[s]]
    worst = max(max(jaccard(words(r["prompt"]), t) for t in template) for r in heldout)
    assert worst < 0.5, worst


def test_heldout_references_are_human_references(tiny_teacher):
    """The held-out split's references score eval/rougeL_reference, and answer_match as well when they
    are at most 3 words long; the template splits' short answers are answer_match only."""
    from tdrl.evaluation import reference_records

    heldout = reference_records(tiny_teacher, "bundled", split="heldout", n=60, max_new_tokens=2)
    with_reference = [r for r in heldout if "human_reference" in r]
    assert with_reference and all(r.get("answer") in (None, r.get("human_reference")) for r in heldout)
    assert {len(r["human_reference"].split()) <= 3 for r in with_reference} == {True, False}
    assert all(("answer" in r) == (len(r["human_reference"].split()) <= 3) for r in with_reference)
    test = reference_records(tiny_teacher, "bundled", split="test", n=40, max_new_tokens=2)
    assert any("answer" in r for r in test) and not any("human_reference" in r for r in test)


def test_config_accepts_heldout_and_refuses_unknown_split():
    from tdrl.errors import ConfigError
    from tdrl.training import TrainConfig

    assert TrainConfig().test.split_name == "heldout"
    assert TrainConfig.from_dict({"test_data": "my.jsonl"}).test.split_name is None  # the file's own split
    with pytest.raises(ConfigError, match="heldout"):
        TrainConfig.from_dict({"test_split": "dev"})


def test_a_slice_of_a_bundled_split(tiny_teacher):
    """``heldout[-8:]`` is the last 8 held-out prompts (the datasets slicing syntax, in records), and its
    references are still human references; a slice of an unknown split is refused."""
    from tdrl.errors import ConfigError, DataError
    from tdrl.evaluation import reference_records
    from tdrl.training import TrainConfig

    heldout = load_source("bundled", split="heldout")["prompt"]
    assert load_source("bundled", split="heldout[-8:]")["prompt"] == heldout[-8:]
    assert load_source("bundled", split="heldout[3:5]")["prompt"] == heldout[3:5]
    assert load_source("bundled", split="test[:4]")["prompt"] == load_source("bundled", split="test")["prompt"][:4]
    last = reference_records(tiny_teacher, "bundled", split="heldout[-40:]", n=40, max_new_tokens=2)
    assert [r["prompt"] for r in last] == heldout[-40:] and any("human_reference" in r for r in last)
    assert TrainConfig.from_dict({"eval_split": "heldout[-64:]"}).eval.split == "heldout[-64:]"
    for bad in ("dev[:3]", "heldout[a:]", "heldout[-8]"):
        with pytest.raises(ConfigError, match="slice"):
            TrainConfig.from_dict({"test_split": bad})
    with pytest.raises(ConfigError, match="slice"):
        load_source("bundled", split="dev[:3]")
    assert load_source("bundled", split="heldout[:]")["prompt"] == heldout
    assert load_source("bundled", split="heldout[:-2]")["prompt"] == heldout[:-2]
    with pytest.raises(DataError, match="selects no records.*holds 320"):
        load_source("bundled", split="heldout[500:]")


def test_a_column_only_later_records_have_is_kept(tmp_path):
    """datasets.Dataset.from_list reads its columns off the first record; a reference present from the
    second record on must survive (it did not: the held-out references vanished from a file source)."""
    import json

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "reference": "B"}) + "\n")
    ds = load_source(path, response_column="reference")
    assert ds["response"] == [None, "B"]
    assert any(r.get("reference") for r in load_source("bundled", split="test").to_list())


def test_outside_mass_and_mode_outside_at_the_students_own_states_by_brute_force(tiny_teacher):
    """eval/outside_mass and eval/mode_outside against a full softmax of the student's own forward pass
    at the states that chose each sampled token, and the teacher's A_p(s) taken from its full logits."""
    import torch

    from tdrl.actions import top_p_subset
    from tdrl.evaluation.decoding import EvalConfig, decode
    from tdrl.models.lm import LM
    from tdrl.models.student import Student
    from tdrl.testing import tiny_student_model

    model, tokenizer = tiny_student_model()
    prompts = ["name a colour", "what is two plus two", "say hello"]
    config = EvalConfig(max_new_tokens=6, seeds=[0], temperature=0.7)
    prompt_ids = [tiny_teacher.encode_prompt(p) for p in prompts]
    records = [{"prompt": p} for p in prompts]
    lm, student = LM(model, tokenizer, freeze=False), Student(model)
    generation = decode(lm, student, tiny_teacher, records, prompt_ids, config, seed=0)
    responses = generation.responses
    scale = 1 / 0.7
    got = {
        "states": generation.tokens,
        "outside_mass": sum(v.sum().item() for v in generation.outside_mass),
        "mode_outside": sum(v.sum().item() for v in generation.mode_outside),
    }
    outside, mode_out, states = 0.0, 0, 0
    with torch.no_grad():
        for prompt, response in zip(prompt_ids, responses):
            ids = torch.tensor([prompt + response])
            lo, hi = len(prompt) - 1, len(prompt) - 1 + len(response)
            probs = torch.softmax(scale * model(ids).logits[0, lo:hi].double(), -1)
            subset = top_p_subset(
                tiny_teacher.logits(ids)[0, lo:hi], top_k=config.coverage_top_k, top_p=config.coverage_top_p
            )
            for t in range(len(response)):
                members = subset.ids[t][subset.mask[t]].tolist()
                outside += 1.0 - float(probs[t, members].sum())
                mode_out += int(int(probs[t].argmax()) not in members)
                states += 1
    assert states == got["states"] > 10 and 0 < mode_out < states  # both cases occur
    assert got["outside_mass"] == pytest.approx(outside, abs=1e-4)
    assert got["mode_outside"] == mode_out
