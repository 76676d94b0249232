"""Runs and caches are never lost or silently wrong: each case a careless or hostile user tried, with
its behaviour now (one line and exit status 2, or the right thing), and nothing written before lost."""

import json
import shutil

import pytest

from tdrl.cli import main
from tdrl.data import ANNOTATION_META
from tdrl.integrity import DirectoryLock

TINY = (
    "--teacher tiny --student tiny --data bundled --train-prompts 16 --response-tokens 6 --batch-size 4 "
    "--eval-prompts 2 --eval-max-new-tokens 4 --test-prompts 0 --eval-every 0"
).split()


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))


def fails(capsys, argv, *needles) -> str:
    """``tdrl argv`` exits 2 with one line on stderr holding every needle, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tdrl:")]  # progress bars may precede it
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    err = errors[0]
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def train(out, *extra) -> int:
    return main(["train", "--agent", "bc", "--steps", "2", "--checkpoint-every", "1", "--out", str(out), *TINY, *extra])


def train_on(data, out) -> list[str]:
    """The command line of a one-step run into ``out`` on the annotation cache ``data``."""
    return ["train", "--steps", "1", "--out", str(out), *TINY, "--data", str(data)]


def annotate_argv(source, out, flags: str = "") -> list[str]:
    """``tdrl annotate`` with the tiny teacher of ``source`` into ``out``, plus ``flags`` (space-separated)."""
    return ["annotate", "--teacher", "tiny", "--source", str(source), "--out", str(out), *flags.split()]


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def flip_a_byte(path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -------------------------------------------------------------------------------- 1. resume writes where pointed
def test_resume_writes_into_the_directory_it_was_given(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    assert train(a) == 0
    shutil.copytree(a, b)
    before = snapshot(a)
    assert main(["train", "--resume", str(b), "--steps", "4"]) == 0
    assert snapshot(a) == before  # the original run is untouched
    assert json.loads((b / "summary.json").read_text())["steps"] == 4
    assert (b / "checkpoints" / "step-0000004").is_dir()


# -------------------------------------------------------------------------------- 2. one run per directory
def test_a_second_run_into_a_run_directory_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out) == 0
    before = snapshot(out)
    capsys.readouterr()
    fails(
        capsys, ["train", "--agent", "sql", "--steps", "2", "--out", str(out), *TINY], "already holds a run", "--resume"
    )
    assert snapshot(out) == before
    assert main(["train", "--agent", "sql", "--steps", "1", "--out", str(out), "--overwrite", *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["agent"] == "sql"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no mix of two runs


def test_two_writers_cannot_share_a_run_directory(tmp_path, capsys):
    out = tmp_path / "busy"
    with DirectoryLock(out):  # another process holding the run directory
        fails(capsys, ["train", "--steps", "1", "--out", str(out), *TINY], "another tdrl process is writing")
    assert train(out) == 0  # released: the run goes ahead


# -------------------------------------------------------------------------------- 3. integrity
def annotated(tmp_path, capsys, name="ann", *extra):
    """Tiny-teacher responses to 12 bundled prompts, annotated into three shards of four."""
    out = tmp_path / name
    responses = tmp_path / f"{name}-responses"
    generate = "generate-responses --teacher tiny --source bundled --split validation --limit 12 --max-new-tokens 5"
    assert main([*generate.split(), "--out", str(responses)]) == 0
    assert main(annotate_argv(responses, out, "--shard-size 4 --top-k 8") + list(extra)) == 0
    capsys.readouterr()
    return out


def test_a_damaged_or_missing_cache_shard_is_named_not_trained_on(tmp_path, capsys):
    out = annotated(tmp_path, capsys)
    shard = sorted((out / "shards").glob("shard-*"))[1]
    arrow = next(shard.glob("*.arrow"))
    flip_a_byte(arrow)
    fails(capsys, train_on(out, tmp_path / "r1"), "damaged", shard.name)
    shutil.rmtree(shard)
    fails(capsys, train_on(out, tmp_path / "r2"), "missing")
    # the same annotate call rebuilds just that shard, and the cache trains again
    responses = tmp_path / "ann-responses"
    assert main(annotate_argv(responses, out, "--shard-size 4 --top-k 8")) == 0
    assert main(train_on(out, tmp_path / "r3")) == 0


def test_token_ids_outside_the_vocabulary_never_train(tmp_path, capsys):
    import datasets

    out = annotated(tmp_path, capsys, "ids")
    shard = sorted((out / "shards").glob("shard-*"))[0]
    # the compact layout stores ids as uint16 (a 512-token vocabulary): an id past the vocabulary, not a negative one
    data = datasets.load_from_disk(str(shard)).map(lambda r: {"cand_ids": [60000] + r["cand_ids"][1:]})
    tmp = tmp_path / "rewritten"
    data.save_to_disk(str(tmp))
    for f in tmp.iterdir():  # the same names; then re-seal the shard as if it had been written so
        shutil.copy(f, shard / f.name)
    from tdrl.integrity import write_manifest

    write_manifest(shard)
    fails(capsys, train_on(out, tmp_path / "r"), "cand_ids outside 0..511")


@pytest.mark.parametrize("damaged", ["optimizer.bin", "model.safetensors", "random_states_0.pkl"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(damaged, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--steps", "3", "--keep-last", "2") == 0
    newest = out / "checkpoints" / "step-0000003"
    flip_a_byte(newest / damaged, 200)
    assert main(["train", "--resume", str(out), "--steps", "4"]) == 0  # resumed from step 2, not the damaged 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    for step in (3, 4):
        flip_a_byte(out / "checkpoints" / f"step-000000{step}" / damaged, 200)
    capsys.readouterr()
    fails(capsys, ["train", "--resume", str(out)], "no intact checkpoint", damaged)


def test_resume_refuses_a_changed_cache_or_teacher(tmp_path, capsys):
    out = tmp_path / "run"
    data = annotated(tmp_path, capsys, "first")
    assert train(out, "--data", str(data)) == 0
    shutil.rmtree(data)
    responses = tmp_path / "first-responses"
    assert main(annotate_argv(responses, data, "--shard-size 4 --top-k 4 --top-p 0.5")) == 0
    capsys.readouterr()
    fails(capsys, ["train", "--resume", str(out), "--steps", "3"], "the annotation cache changed")


def test_a_cache_made_by_another_teacher_is_refused(tmp_path, capsys):
    from tdrl.data import annotate, load_source
    from tdrl.models import Teacher
    from tdrl.testing import tiny_teacher

    other = tiny_teacher(seed=5)  # the same tokenizer, other weights
    responses = load_source(str(annotated(tmp_path, capsys, "x").parent / "x-responses"))
    out = annotate(Teacher(other.model, other.tokenizer, name="tiny-teacher-0"), responses, tmp_path / "other", top_k=8)
    fails(capsys, train_on(out, tmp_path / "r"), "made by another teacher")


# -------------------------------------------------------------------------------- 4. crashes that are now errors
def test_no_record_fits_is_an_error_that_leaves_no_broken_cache(tmp_path, capsys):
    responses = tmp_path / "resp"
    generate = "generate-responses --teacher tiny --source bundled --split validation --limit 4 --max-new-tokens 4"
    assert main([*generate.split(), "--out", str(responses)]) == 0
    out = tmp_path / "ann"
    fails(capsys, annotate_argv(responses, out, "--max-prompt-len 1"), "no record fits", "prompt_too_long")
    assert main(annotate_argv(responses, out)) == 0  # corrected


def test_hostile_response_ids_and_lengths(tmp_path, capsys):
    for i, ids in enumerate(([-1], [99999], "abc")):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(json.dumps({"prompt": "hi", "response": "x", "response_ids": ids}) + "\n")
        fails(capsys, annotate_argv(path, tmp_path / f"a{i}"), "response_ids")
        assert not (tmp_path / f"a{i}").exists()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hi", "response": "x", "response_ids": [7] * 600}) + "\n")
    fails(capsys, annotate_argv(long, tmp_path / "s", "--max-response-len 1000 --strict"), "context of 512")
    negative = annotate_argv(long, tmp_path / "n", "--max-response-len -3")
    fails(capsys, negative, "max_response_len must be an integer >= 1")
    generate = "generate-responses --teacher tiny --source bundled --limit 2 --max-new-tokens 600"
    fails(capsys, [*generate.split(), "--out", str(tmp_path / "g")], "context of 512")


def test_an_environment_longer_than_the_teachers_context_is_refused_at_construction():
    from tdrl.envs import TokenGenerationEnv
    from tdrl.errors import ConfigError
    from tdrl.testing import tiny_teacher

    with pytest.raises(ConfigError, match="context of 512"):
        TokenGenerationEnv(tiny_teacher(), ["hi"], max_new_tokens=600)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--agent", "sql", "--agent-args", "alpha=abc"], "alpha must be float"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--steps", "0"], "--steps must lie in [1, inf)"),
        (["--online-ratio", "1.5"], "--online-ratio must lie in [0, 1]"),
    ],
)
def test_bad_values_are_one_line_and_leave_no_output_directory(argv, needle, tmp_path, capsys):
    out = tmp_path / "never"
    fails(capsys, ["train", "--out", str(out), *TINY, *argv], needle)
    assert not out.exists()  # the corrected command is not blocked by a half-made directory


def test_yaml_null_and_csv_extra_fields_and_eval_prompts_zero(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: null\n")
    fails(capsys, ["train", "--config", str(cfg), *TINY], "steps must be int")
    table = tmp_path / "p.csv"
    table.write_text("prompt,response\nhello,world,extra\n")
    fails(capsys, annotate_argv(table, tmp_path / "c"), "row 2 has more fields than the header")
    run = tmp_path / "run"
    assert train(run) == 0
    capsys.readouterr()
    fails(capsys, ["eval", "--checkpoint", str(run), "--prompts", "0"], "must be >= 1")


def test_out_naming_a_file_and_truncated_model_files(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    fails(capsys, ["train", "--steps", "1", "--out", str(tmp_path / "file"), *TINY], "is a file")
    run = tmp_path / "run"
    assert train(run) == 0
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    fails(capsys, ["eval", "--checkpoint", str(run / "best"), "--prompts", "1"])


def test_two_annotations_into_one_directory_do_not_race(tmp_path, capsys):
    out, source = tmp_path / "ann", tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    with DirectoryLock(out):
        fails(capsys, annotate_argv(source, out), "another tdrl process")
    assert main(annotate_argv(source, out)) == 0


# -------------------------------------------------------------------------------- 5. names resolve locally first
def test_names_that_look_local_are_never_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):  # a hub call here would be the leak the rule forbids
        raise AssertionError("the hub was asked")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    fails(
        capsys, ["annotate", "--teacher", "tiny", "--source", "my_prompts.jsonl", "--out", "a"], "does not exist here"
    )
    fails(capsys, ["teacher-info", "--teacher", "tinyy"], "hub:tinyy")
    fails(capsys, ["train", "--steps", "1", "--out", "o", *TINY, "--student", "runs/dir"], "does not exist here")
    from tdrl.models import resolve_name

    assert resolve_name("HuggingFaceTB/SmolLM2-135M-Instruct", "teacher") == (
        "hub",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert resolve_name("hub:gpt2", "teacher") == ("hub", "gpt2")
    assert resolve_name(str(tmp_path / "runs"), "teacher") == ("local", str(tmp_path / "runs"))


# -------------------------------------------------------------------------------- 6. messages
def test_messages_name_the_file_and_the_interrupt(tmp_path, capsys, monkeypatch):
    out = annotated(tmp_path, capsys, "meta")
    (out / ANNOTATION_META).write_text("{not json")
    fails(capsys, train_on(out, tmp_path / "r"), str(out / ANNOTATION_META), "not valid JSON")

    import tdrl.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tdrl.cli, "cmd_agents", interrupted)
    parser_func = tdrl.cli.build_parser
    monkeypatch.setattr(tdrl.cli, "build_parser", lambda argv=(): _with_agents(parser_func(argv), interrupted))
    assert main(["agents"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("tdrl: interrupted") and err.strip() != "tdrl:"
    fails(capsys, ["compare", "--agents", "kd", "--seeds", "0", *TINY, "--out", str(tmp_path / "c")], "--seeds")


def _with_agents(parser, func):
    parser._subparsers._group_actions[0].choices["agents"].set_defaults(func=func)
    return parser
