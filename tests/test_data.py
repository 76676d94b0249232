"""Offline data: sources, teacher responses, the annotation cache, batching."""

import importlib
import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch

from tdrl.actions import nucleus_mask, top_p_subset
from tdrl.data import (
    ANNOTATION_META,
    SPLITS,
    BucketBatchSampler,
    DistillDataset,
    annotate,
    check_same_vocabulary,
    collate,
    generate_responses,
    load_annotations,
    load_source,
)
from tdrl.data.layout import decode, full_layout, recode
from tdrl.errors import ConfigError, DataError, VocabularyMismatchError


@pytest.fixture(scope="module")
def small_source():
    from tdrl.testing import tiny_teacher

    prompts = load_source("bundled", split="train").select(range(12))
    rows = prompts.to_list()
    teacher = tiny_teacher()
    responses = teacher.generate([r["prompt"] for r in rows], 9, seed=0)
    for row, ids in zip(rows, responses):
        row["response"] = teacher.tokenizer.decode(ids)
        row["response_ids"] = ids
    rows[3]["response_ids"] = rows[3]["response_ids"][:4] + [teacher.eos_token_id]  # one terminated response
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def cache(small_source, tmp_path_factory):
    from tdrl.testing import tiny_teacher

    out = tmp_path_factory.mktemp("ann") / "cache"
    annotate(tiny_teacher(), small_source, out, top_k=16, top_p=0.8, shard_size=5, batch_size=4)
    return out


def test_bundled_set_size_families_and_splits():
    everything = load_source("bundled")
    assert len(everything) >= 2000
    splits = {s: set(load_source("bundled", split=s)["prompt"]) for s in SPLITS}
    templates = ("train", "validation", "test")  # split=None: the template splits, never heldout
    assert sum(len(splits[s]) for s in templates) == len(everything) == len(set(everything["prompt"]))
    families = Counter(load_source("bundled", split="train")["family"])
    assert len(families) >= 8 and min(families.values()) >= 80
    assert not splits["heldout"] & (splits["train"] | splits["validation"] | splits["test"])
    assert not (splits["train"] & splits["validation"]) and not (splits["train"] & splits["test"])
    assert not (splits["validation"] & splits["test"])
    assert len(splits["validation"]) > 150 and len(splits["test"]) > 150
    with pytest.raises(ConfigError):
        load_source("bundled", split="dev")


def _kept(logprobs: torch.Tensor, size: int, keep: float) -> int:
    """Brute force: the shortest prefix reaching mass ``keep``, at least A_p(s), at most K."""
    probs = np.exp(logprobs.double().numpy())
    n = next((j + 1 for j in range(len(probs)) if probs[: j + 1].sum() >= keep), len(probs))
    return min(max(n, size), len(probs))


def test_annotation_equals_direct_teacher_calls(cache, small_source, tiny_teacher):
    data = load_annotations(cache)
    assert len(data) == len(small_source)
    for raw, src in zip(data, small_source):
        row = decode(raw, 16)
        prompt_ids = tiny_teacher.encode_prompt(src["prompt"])
        assert raw["prompt_ids"] == prompt_ids and raw["response_ids"] == src["response_ids"]
        ids = torch.tensor([prompt_ids + src["response_ids"]])
        ann = tiny_teacher.annotate(ids, top_k=16, top_p=0.8)
        lo, hi = len(prompt_ids) - 1, ids.shape[1] - 1
        for got_ids, got_lp, got_mask, sub in (
            (row["cand_ids"], row["cand_logprobs"], row["cand_mask"], ann.subset[0, lo:hi]),
            (
                row["final_cand_ids"][None],
                row["final_cand_logprobs"][None],
                row["final_cand_mask"][None],
                ann.subset[0, hi : hi + 1],
            ),
        ):
            assert torch.equal(got_mask, sub.mask)  # A_p(s) at the annotation's p: exact
            for j in range(got_ids.shape[0]):
                n = _kept(sub.logprobs[j], int(sub.mask[j].sum()), 0.9)
                assert torch.isfinite(got_lp[j]).sum() == n  # the kept prefix, nothing beyond it
                assert torch.equal(got_ids[j, :n], sub.ids[j, :n])
                # float16: an absolute error below 2**-9 at log-probs above -8
                assert torch.allclose(got_lp[j, :n], sub.logprobs[j, :n], atol=2**-9, rtol=0)
        assert "action_in_cand" not in row  # derived where A_p(s) is used, never stored
        # action_logprob against an independent log-softmax of the full logits
        logprobs = torch.log_softmax(tiny_teacher.logits(ids)[0].double(), -1)
        expected = [logprobs[lo + j, tok].item() for j, tok in enumerate(src["response_ids"])]
        assert np.allclose(row["action_logprob"], expected, atol=1e-4)
        assert row["reward"] == pytest.approx(row["action_logprob"], abs=1e-6)  # reward "logprob"
        assert row["terminated"] == (src["response_ids"][-1] == tiny_teacher.eos_token_id)


def test_round_trip_batch_shapes_padding_and_ends(cache, tiny_teacher):
    ds = DistillDataset(cache, tokenizer=tiny_teacher.tokenizer)
    items = [ds[i] for i in (0, 3, 7)]
    batch = collate(items, tiny_teacher.pad_token_id)
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in items]
    b, t, k = batch["cand_ids"].shape
    assert (b, t, k) == (3, max(lengths), 16)
    for i, r in enumerate(items):
        n_prompt, n = len(r["prompt_ids"]), len(r["response_ids"])
        assert batch["input_ids"][i, : n_prompt + n].tolist() == r["prompt_ids"].tolist() + r["response_ids"].tolist()
        assert (batch["input_ids"][i, n_prompt + n :] == tiny_teacher.pad_token_id).all()
        assert batch["attention_mask"][i].sum() == n_prompt + n
        positions = torch.nonzero(batch["response_mask"][i]).flatten().tolist()
        assert positions == list(range(n_prompt - 1, n_prompt - 1 + n))
        assert torch.nonzero(batch["last"][i]).flatten().tolist() == [n_prompt + n - 2]
        # terminal (V(s') = 0) only where the response ended with EOS; a truncated one bootstraps V(s_T)
        assert batch["terminal"][i].tolist() == (batch["last"][i] & bool(r["terminated"])).tolist()
        assert torch.isneginf(batch["cand_logprobs"][i][~batch["cand_mask"][i]]).all()
        final = n_prompt + n - 1  # the final state s_T holds its candidates; no other non-response position does
        assert torch.equal(batch["cand_ids"][i, final], r["final_cand_ids"].long())
        assert torch.equal(batch["cand_mask"][i, final], r["final_cand_mask"])
        others = ~batch["response_mask"][i]
        others[final] = False
        assert not batch["cand_mask"][i][others].any()
    assert sorted(bool(r["terminated"]) for r in items) == [False, False, True]  # both kinds of end are covered
    assert batch["terminated"].tolist() == [bool(r["terminated"]) for r in items]


def test_interrupted_annotate_resumes_to_the_same_dataset(small_source, tiny_teacher, tmp_path, cache, monkeypatch):
    out = tmp_path / "resumed"
    kwargs = dict(top_k=16, top_p=0.8, shard_size=5, batch_size=4)
    annotate(tiny_teacher, small_source, out, stop_after_shards=1, **kwargs)
    with pytest.raises(DataError, match="incomplete"):
        load_annotations(out)
    assert len(list((out / "shards").glob("shard-*"))) == 1
    save = datasets.Dataset.save_to_disk

    def crash_mid_write(self, path, **kw):  # the Arrow data is on disk, the shard record and manifest are not
        save(self, path, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        annotate(tiny_teacher, small_source, out, **kwargs)
    monkeypatch.undo()
    assert [p.name for p in (out / "shards").iterdir()] == ["shard-00000"]  # no half shard, no temporary
    annotate(tiny_teacher, small_source, out, **kwargs)
    a, b = load_annotations(out), load_annotations(cache)
    assert a.to_list() == b.to_list()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000", "shard-00001", "shard-00002"]


def test_fingerprint_mismatch_is_an_error(small_source, tiny_teacher, cache):
    with pytest.raises(DataError, match="top_p"):
        annotate(tiny_teacher, small_source, cache, top_k=16, top_p=0.5, shard_size=5)


def test_cache_for_another_tokenizer_is_refused(cache, markov_teacher):
    with pytest.raises(VocabularyMismatchError, match="another tokenizer"):
        DistillDataset(cache, tokenizer=markov_teacher.tokenizer)


def test_vocabulary_check(tiny_teacher, markov_teacher):
    from tdrl.testing import tiny_student_model

    _, student_tokenizer = tiny_student_model()
    check_same_vocabulary(tiny_teacher.tokenizer, student_tokenizer)
    with pytest.raises(VocabularyMismatchError, match="different vocabularies"):
        check_same_vocabulary(tiny_teacher.tokenizer, markov_teacher.tokenizer)


def test_interrupted_generate_responses_resumes_identically(tiny_teacher, tmp_path, monkeypatch):
    generate = importlib.import_module("tdrl.data.generate")
    prompts = load_source("bundled", split="validation").select(range(6))
    kwargs = dict(num_responses=2, max_new_tokens=6, shard_size=4, batch_size=3, seed=1)
    full = generate_responses(tiny_teacher, prompts, tmp_path / "full", **kwargs)
    part = tmp_path / "part"
    generate_responses(tiny_teacher, prompts, part, stop_after_shards=1, **kwargs)
    with pytest.raises(DataError, match="unfinished"):
        load_source(part)
    record, calls = generate._record, []

    def crash_mid_shard(*args):  # the second shard's 4th record: three are written, the shard is not complete
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return record(*args)

    monkeypatch.setattr(generate, "_record", crash_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        generate_responses(tiny_teacher, prompts, part, **kwargs)
    monkeypatch.undo()
    assert [p.name for p in (part / "shards").iterdir()] == ["shard-00000.jsonl"]  # no half shard, no temporary
    generate_responses(tiny_teacher, prompts, part, **kwargs)
    a, b = load_source(full), load_source(part)
    assert a.to_list() == b.to_list() and len(a) == 12
    assert a[0]["id"].endswith("#0") and a[1]["id"].endswith("#1") and a[0]["prompt"] == a[1]["prompt"]
    with pytest.raises(DataError, match="different settings"):
        generate_responses(tiny_teacher, prompts, part, **(kwargs | {"seed": 2}))


def test_recut_of_cached_logprobs_matches_top_p_subset():
    logits = 3 * torch.randn(5, 7, 100)
    cached = top_p_subset(logits, top_k=32, top_p=1.0)
    for p in (0.3, 0.5, 0.8, 1.0):
        assert torch.equal(nucleus_mask(cached.logprobs, p), top_p_subset(logits, top_k=32, top_p=p).mask)


def test_distill_dataset_recut_to_smaller_p(cache):
    wide, narrow = DistillDataset(cache), DistillDataset(cache, top_p=0.3)
    a, b = wide[0], narrow[0]
    assert (b["cand_mask"] <= a["cand_mask"]).all() and b["cand_mask"].sum() < a["cand_mask"].sum()


def brute_force_top_p(probs: list[float], k: int, p: float) -> set[int]:
    """A_p by hand: the k most probable token ids, then the shortest prefix of them reaching mass p."""
    order = sorted(range(len(probs)), key=lambda a: -probs[a])[:k]
    chosen, mass = set(), 0.0
    for a in order:
        if mass >= p:
            break
        chosen.add(a)
        mass += probs[a]
    return chosen


def test_data_token_membership_after_a_recut_is_brute_force_membership(cache, tiny_teacher):
    """Re-cut from the annotation's p = 0.8 to 0.3, cached records (DistillDataset) and online episodes
    (env records re-cut by collate) alike: the agents' ``action_in_set`` equals membership in A_0.3(s)
    computed by hand from the teacher's own full distribution at every position."""
    from tdrl.agents import make_agent
    from tdrl.envs import TeacherPolicy, TokenGenerationEnv, rollout
    from tdrl.models import load_student
    from tdrl.records import record_tensors

    ds = DistillDataset(cache, top_p=0.3)
    cached = [ds[i] for i in range(len(ds))]
    env = TokenGenerationEnv(tiny_teacher, ["Name three colors.", "hi"], top_k=16, top_p=0.8, max_new_tokens=6)
    online = [record_tensors(r) for r in rollout(env, TeacherPolicy(seed=0, temperature=2.0), 4, seed=0)]
    agent = make_agent("bc", load_student("tiny"))
    for records in (cached, online):
        batch = collate(records, tiny_teacher.pad_token_id, top_p=0.3)
        t = agent.transitions(batch)
        expected = []
        for r in records:
            ids = list(map(int, r["prompt_ids"])) + list(map(int, r["response_ids"]))
            probs = torch.softmax(tiny_teacher.logits(torch.tensor([ids]))[0].double(), -1)
            lo = len(r["prompt_ids"]) - 1
            for j, token in enumerate(map(int, r["response_ids"])):
                expected.append(token in brute_force_top_p(probs[lo + j].tolist(), 16, 0.3))
        assert t.action_in_set.tolist() == expected
        assert 0 < sum(expected) < len(expected)  # both cases occur: the re-cut moved tokens out of the set
    wide = agent.transitions(collate(online, tiny_teacher.pad_token_id)).action_in_set
    assert wide.all() and not t.action_in_set.all()  # at 0.8 the teacher's own samples were all inside


def test_recut_cuts_the_final_state_too(tiny_teacher):
    """recut re-cuts A_p at the final state s_T as well (V(s_T) of a truncated response reads it), and
    collate puts the re-cut set at the position after the last response token."""
    from tdrl.envs import TeacherPolicy, TokenGenerationEnv, rollout
    from tdrl.records import record_tensors, recut

    env = TokenGenerationEnv(tiny_teacher, ["Name three colors.", "hi"], top_k=16, top_p=0.8, max_new_tokens=6)
    records = [record_tensors(r) for r in rollout(env, TeacherPolicy(seed=0, temperature=2.0), 4, seed=0)]
    batch = collate(records, tiny_teacher.pad_token_id, top_p=0.3)
    shrunk = 0
    for i, r in enumerate(records):
        expected = nucleus_mask(r["final_cand_logprobs"].float(), 0.3)
        assert torch.equal(recut(r, 0.3)["final_cand_mask"], expected)
        final = len(r["prompt_ids"]) + len(r["response_ids"]) - 1
        assert torch.equal(batch["cand_mask"][i, final], expected)
        shrunk += int(expected.sum() < r["final_cand_mask"].sum())
    assert shrunk > 0  # the re-cut changed at least one final set (not vacuous)


def test_an_env_episode_is_not_grown_silently(tiny_teacher):
    """Env episodes carry the teacher's log-probs on their own A_p(s) only: re-cutting one at a smaller
    or equal p works, at a larger p it is refused (it could not grow the set); the cache re-cuts up."""
    from tdrl.envs import TeacherPolicy, TokenGenerationEnv, rollout
    from tdrl.records import record_tensors, recut

    env = TokenGenerationEnv(tiny_teacher, ["Name three colors."], top_k=16, top_p=0.5, max_new_tokens=5)
    record = record_tensors(rollout(env, TeacherPolicy(seed=0), 1, seed=0)[0])
    assert torch.equal(recut(record, 0.5)["cand_mask"], record["cand_mask"])
    assert (recut(record, 0.3)["cand_mask"] <= record["cand_mask"]).all()
    with pytest.raises(ValueError, match="cannot be re-cut at the larger p = 0.9"):
        recut(record, 0.9)


def test_a_full_layout_cache_of_tdrl_0_2_trains_on_the_same_batches(cache, tiny_teacher, tmp_path):
    """Old caches (schema 2: K-wide int32 ids, float32 log-probs, a bool mask) load and give the batches of
    the compact cache they were converted from, at the cache's p and re-cut at a smaller one."""
    compact = DistillDataset(cache, tokenizer=tiny_teacher.tokenizer)
    full_data = full_layout(compact.data, 16)
    assert "cand_mask" in full_data.column_names and "cand_count" not in full_data.column_names
    full_data.save_to_disk(str(tmp_path / "full"))
    for top_p in (None, 0.5):
        a = DistillDataset(datasets.load_from_disk(str(tmp_path / "full")), top_p=top_p)
        b = DistillDataset(compact.data, top_p=top_p)
        assert not a.compact and b.compact
        for i in range(len(compact)):
            x, y = a[i], b[i]
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), (i, key)


def test_a_compact_cache_refuses_a_re_cut_beyond_what_it_keeps(cache, tiny_teacher):
    ds = DistillDataset(cache, top_p=0.9)  # up to keep_top_p: accepted
    assert ds.keep_top_p == 0.9 and len(ds[0]["cand_mask"]) > 0
    for top_p in (0.91, 1.0):
        with pytest.raises(ConfigError, match=r"keep_top_p = 0.9.*--keep-top-p"):
            DistillDataset(cache, top_p=top_p)
    with pytest.raises(ConfigError, match="keep_top_p must lie in"):
        annotate(
            tiny_teacher,
            datasets.Dataset.from_list([{"id": "a", "prompt": "x", "response": "y"}]),
            cache.parent / "x",
            top_p=0.9,
            keep_top_p=0.8,
        )


def test_a_cache_without_the_final_states_is_refused_with_advice(cache):
    full = full_layout(load_annotations(cache), 16)
    old = full.remove_columns(["final_cand_ids", "final_cand_logprobs", "final_cand_mask"])
    with pytest.raises(DataError, match="final_cand_ids.*rebuild it with `tdrl annotate`"):
        DistillDataset(old)


def test_sources_files_columns_and_context(tmp_path):
    rows = [
        {"instruction": "Say hi", "context": "", "output": "hi"},
        {"instruction": "Summarize", "context": "A long text.", "output": "Short."},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w") as fh:
        fh.write("instruction,context,output\nSay hi,,hi\nSummarize,A long text.,Short.\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        ds = load_source(
            tmp_path / name, prompt_column="instruction", response_column="output", context_column="context"
        )
        assert ds["prompt"] == ["Say hi", "Summarize\n\nA long text."] and ds["response"] == ["hi", "Short."]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ds = load_source(tmp_path / "saved", prompt_column="instruction", response_column="output")
    assert ds["response"] == ["hi", "Short."]


def test_dolly_preset_is_passed_to_the_hub(monkeypatch):
    seen = {}

    def fake_load_dataset(name, split=None):
        seen["name"], seen["split"] = name, split
        return datasets.Dataset.from_list([{"instruction": "Q?", "context": "ctx", "response": "A.", "category": "qa"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_source("dolly")
    assert seen == {"name": "databricks/databricks-dolly-15k", "split": "train"}
    assert ds[0]["prompt"] == "Q?\n\nctx" and ds[0]["response"] == "A."


def test_unreachable_hub_source_is_a_clear_error():
    with pytest.raises(DataError, match="could not load data source"):
        load_source("tdrl-test-org/no-such-dataset")


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ('{"prompt": "ok"}\n{"text": "no prompt here"}\n', "record 1 .* no non-empty 'prompt'"),
        ('{"prompt": "ok"\n', "not valid JSONL"),
        ('{"prompt": "ok", "response": 5}\n', "must be a string"),
    ],
)
def test_malformed_sources_raise(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        load_source(tmp_path / "bad.jsonl")


def test_missing_source_path_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source("./no/such/dir")


def test_annotate_needs_responses_and_skips_long_prompts(tiny_teacher, tmp_path):
    with pytest.raises(DataError, match="no responses"):
        annotate(tiny_teacher, load_source("bundled", split="test").select(range(2)), tmp_path / "a")
    rows = [{"prompt": "short", "response": "ok"}, {"prompt": "long " * 200, "response": "ok"}]
    ds = load_source(datasets.Dataset.from_list(rows))
    out = annotate(tiny_teacher, ds, tmp_path / "b", max_prompt_len=64, top_k=8)
    meta = json.loads((out / ANNOTATION_META).read_text())
    assert meta["records"] == 1 and meta["skipped"] == {"prompt_too_long": 1, "beyond_context": 0, "empty_response": 0}
    row = load_annotations(out)[0]
    assert row["response_ids"][-1] == tiny_teacher.eos_token_id and row["terminated"]  # text responses end in EOS
    with pytest.raises(DataError, match="max_prompt_len"):
        annotate(tiny_teacher, ds, tmp_path / "c", max_prompt_len=64, strict=True)


def test_sampler_is_deterministic_bucketed_and_resumable():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=203)
    a = BucketBatchSampler(lengths, 8, seed=3, pool_batches=4)
    epoch0 = list(a)
    epoch1 = a.batches(1)
    assert sorted(i for b in epoch0 for i in b) == list(range(203))
    assert epoch0 != epoch1 and epoch0 == BucketBatchSampler(lengths, 8, seed=3, pool_batches=4).batches(0)
    assert epoch0 != BucketBatchSampler(lengths, 8, seed=4, pool_batches=4).batches(0)
    spread = np.mean([np.ptp(lengths[b]) for b in epoch0])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(203)[:8]]) for _ in range(50)])
    assert spread < random_spread / 2  # bucketing groups similar lengths
    a.set_epoch(1)
    assert list(a) == epoch1 and list(a) == epoch1  # iteration is a pure function of (seed, epoch)
    # what the trainer does to resume: a prepared loader over the sampler skips the batches consumed
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    fresh = BucketBatchSampler(lengths, 8, seed=3, pool_batches=4)
    loader = accelerator.prepare(DataLoader(list(range(203)), batch_sampler=fresh, collate_fn=list))
    loader.set_epoch(1)
    assert [list(b) for b in accelerator.skip_first_batches(loader, 5)] == epoch1[5:]
    with pytest.raises(ConfigError):
        BucketBatchSampler(lengths, 0)


def test_recode_writes_what_annotate_writes(small_source, tiny_teacher, tmp_path):
    """The benchmark's rewritten layouts are the caches annotate writes: a lossless cache (whole top-K,
    float32) recoded to keep_top_p 0.9 / float16 equals the direct annotation at those settings, column
    by column, and the full layout of it decodes to the lossless cache's tensors."""
    kwargs = dict(top_k=16, top_p=0.8, shard_size=50, batch_size=4)
    lossless = load_annotations(
        annotate(tiny_teacher, small_source, tmp_path / "a", keep_top_p=1.0, logprob_dtype="float32", **kwargs)
    )
    direct = load_annotations(annotate(tiny_teacher, small_source, tmp_path / "b", keep_top_p=0.9, **kwargs))
    recoded = recode(lossless, 16, tiny_teacher.vocab_size, 0.9, "float16")
    assert recoded.features == direct.features
    assert recoded.to_dict() == direct.to_dict()
    assert sum(map(sum, direct["cand_count"])) < sum(map(sum, lossless["cand_count"]))  # fewer candidates kept
    # at the cache's p, training reads A_p(s) alone: every float16 layout gives the same batches (the ids
    # beyond A_p(s) aside: padding here, the teacher's there) and the same losses and gradients
    from tdrl.agents import make_agent
    from tdrl.models import load_student

    wider = DistillDataset(recode(lossless, 16, tiny_teacher.vocab_size, 1.0, "float16"))
    narrow = DistillDataset(direct)
    x = collate([wider[i] for i in range(4)], tiny_teacher.pad_token_id)
    y = collate([narrow[i] for i in range(4)], tiny_teacher.pad_token_id)
    assert not torch.equal(x["cand_ids"], y["cand_ids"])
    assert torch.equal(x["cand_ids"][x["cand_mask"]], y["cand_ids"][y["cand_mask"]])
    assert all(torch.equal(x[k], y[k]) for k in x if k != "cand_ids")
    for name in ("bc", "sql", "iql", "bd"):
        torch.manual_seed(0)
        agent = make_agent(name, load_student("tiny"))
        grads = []
        for batch in (x, y):
            agent.zero_grad()
            loss, _ = agent(batch)
            loss.backward()
            grads.append([p.grad.clone() for p in agent.parameters() if p.grad is not None])
        assert all(torch.equal(a, b) for a, b in zip(*grads)), name
    full = full_layout(lossless, 16)
    for i in range(len(full)):
        x, y = decode(full.with_format("numpy")[i], 16), decode(lossless.with_format("numpy")[i], 16)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_the_bundled_annotation_keeps_what_the_agent_re_cuts_at():
    from tdrl.agents import make_agent  # noqa: F401  (registers the agents)
    from tdrl.agents.iqlearn import IQLearnConfig
    from tdrl.data.bundled import KEEP_TOP_P, bundled_keep_top_p
    from tdrl.training.groups import DataConfig

    assert bundled_keep_top_p(DataConfig(), IQLearnConfig()) == KEEP_TOP_P == 0.9
    assert bundled_keep_top_p(DataConfig(), IQLearnConfig(top_p=1.0)) == 1.0  # bd:top_p=1.0 reads the whole top-K
    assert bundled_keep_top_p(DataConfig(), IQLearnConfig(top_p=0.5)) == 0.9
    assert bundled_keep_top_p(DataConfig(annotation_keep_top_p=0.85), IQLearnConfig()) == 0.85
    assert bundled_keep_top_p(DataConfig(annotation_top_p=0.97), IQLearnConfig()) == 0.97
    assert bundled_keep_top_p(DataConfig(annotation_keep_top_p=0.5), IQLearnConfig()) == 0.8  # A_p(s) is kept anyway
    with pytest.raises(ConfigError, match=r"--annotation-keep-top-p must lie in \(0, 1\]"):
        DataConfig(annotation_keep_top_p=1.5)
    with pytest.raises(ConfigError, match="--annotation-keep-top-p must be a finite number"):
        DataConfig(annotation_keep_top_p=float("nan"))


def test_review_findings_on_compact_caches_in_memory(cache, small_source, tiny_teacher, tmp_path):
    """A compact cache given as a loaded Dataset (no metadata): its K is the widest set any state holds (not
    only the final states'), and a re-cut past what it keeps is refused by recut's own reach check instead
    of taking every kept candidate as the set. annotate's keep_top_p defaults to max(0.9, top_p)."""
    from tdrl.data.dataset import cache_width
    from tdrl.data.layout import encode_sets

    data = load_annotations(cache)
    assert cache_width(data) == cache_width(data, {"top_k": 16, "vocab_size": 512}) == 16
    narrow = data.map(lambda r: {"final_cand_count": r["final_cand_size"]})  # finals keep A_p(s) only
    assert cache_width(narrow) == max(max(c) for c in data["cand_count"])
    with pytest.raises(ValueError, match="cannot be re-cut at the larger p"):
        DistillDataset(data, top_p=0.99)[0]
    assert DistillDataset(data, top_p=0.5)[0]["cand_mask"].any()
    out = annotate(tiny_teacher, small_source.select(range(2)), tmp_path / "p95", top_k=16, top_p=0.95)
    assert json.loads((out / "tdrl-annotation.json").read_text())["settings"]["keep_top_p"] == 0.95
    assert encode_sets  # (imported: the layout's writer)
