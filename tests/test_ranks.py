"""Several processes writing one data directory (tdrl.data.ranks): two gloo ranks under torchrun write,
record for record and byte for byte, the responses and the annotation cache one process writes, resume an
interrupted run, and share one rank's error with the other instead of leaving it waiting."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tdrl.data import annotate, generate_responses, load_annotations, load_source
from tdrl.data.ranks import Ranks, _raise_first
from tdrl.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from ranks_worker import ANNOTATE, GENERATE, PROMPTS  # noqa: E402


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_one_process_ranks_run_everything_and_raise_their_own_error():
    ranks = Ranks()
    assert ranks.is_main and ranks.mine([0, 1, 2]) == [0, 1, 2] and ranks.on_main(lambda: [1, 2]) == [1, 2]
    assert Ranks(rank=1, world_size=3).mine(list(range(8))) == [1, 4, 7]
    own = DataError("mine")
    with pytest.raises(DataError) as caught:
        ranks.on_all(lambda: (_ for _ in ()).throw(own))
    assert caught.value is own  # the failing rank keeps its own exception (and traceback)


def test_another_rank_raises_the_failing_ranks_error_by_class_and_message():
    with pytest.raises(ConfigError, match="^locked$"):
        _raise_first([{}, {"error": "ConfigError", "message": "locked"}], None)
    with pytest.raises(OSError, match="disk full"):
        _raise_first([{"error": "OSError", "message": "disk full"}, {}], None)
    with pytest.raises(RuntimeError, match="rank 1 failed with SomeBug: boom"):
        _raise_first([{}, {"error": "SomeBug", "message": "boom"}, {"error": "ValueError", "message": "x"}], None)
    _raise_first([{}, {}], None)  # nobody failed


def test_two_gloo_ranks_write_what_one_process_writes(tmp_path, tiny_teacher):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = tmp_path / "two"
    two.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), str(Path(__file__).with_name("ranks_worker.py")), str(two)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    one = tmp_path / "one"
    prompts = load_source("bundled", split="validation").select(range(PROMPTS))
    generate_responses(tiny_teacher, prompts, one / "responses", **GENERATE)
    annotate(tiny_teacher, load_source(one / "responses"), one / "cache", **ANNOTATE)
    for name in ("responses", "cache"):  # every file alike, metadata and manifests included
        assert files(one / name) == files(two / name), name
    assert load_source(two / "responses").to_list() == load_source(one / "responses").to_list()
    assert load_annotations(two / "cache").to_list() == load_annotations(one / "cache").to_list()
    r0, r1 = (json.loads((two / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    # interrupted after 3 shards in all, rank 0 wrote every other one; the rerun shared out the rest
    assert r0["responses_after_interruption"] == [f"shard-0000{i}.jsonl" for i in range(3)]
    assert r0["generated"] == [["shard-00000.jsonl", "shard-00002.jsonl"], ["shard-00003.jsonl", "shard-00005.jsonl"]]
    assert r1["generated"] == [["shard-00001.jsonl"], ["shard-00004.jsonl", "shard-00006.jsonl"]]
    assert r0["cache_after_interruption"] == ["shard-00000", "shard-00001", "shard-00002"]
    # the rerun: the damaged shard 1 and shards 3, 4 were left, split between the ranks; then the strict run's
    # (the lock test handed out none: rank 0 was refused the lock before)
    assert r0["annotated"] == [[0, 2], [1, 4], [0, 2, 4]] and r1["annotated"] == [[1], [3], [1, 3]]
    assert r0["locked"] == r1["locked"] and "another tdrl process is writing" in r0["locked"]
    assert r1["strict"].startswith("record") and r0["strict"] == r1["strict"] and "--strict" in r0["strict"]
    assert r0["strict_shards"] == ["shard-00000", "shard-00002", "shard-00004"]  # rank 0's shards are kept
