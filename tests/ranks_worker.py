"""One rank of tests/test_ranks.py's two-process run (``torchrun --nproc_per_node 2 tests/ranks_worker.py ROOT``).

Every rank runs the same steps, each a collective of the data writers, and writes what it saw to
``ROOT/rank-<r>.json``: the shards it was handed, and the errors it raised. The test compares the
directories with one process's and reads the reports.
"""

import json
import sys
from pathlib import Path

#: The settings of both writers, for the library calls here, the CLI calls here and the test's one process.
GENERATE = {"num_responses": 2, "max_new_tokens": 6, "shard_size": 2, "batch_size": 2, "seed": 3}
ANNOTATE = {"top_k": 16, "top_p": 0.8, "shard_size": 3, "batch_size": 2}
PROMPTS = 7  # bundled validation prompts: 14 responses, 7 response shards, 5 annotation shards


def flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def main(root: Path) -> None:
    import importlib

    from tdrl.cli import main as cli
    from tdrl.data import annotate, generate_responses, load_source
    from tdrl.data.ranks import Ranks
    from tdrl.errors import ConfigError, DataError
    from tdrl.integrity import DirectoryLock
    from tdrl.models import load_teacher

    annotate_module, generate_module = (importlib.import_module(f"tdrl.data.{m}") for m in ("annotate", "generate"))
    report: dict = {"generated": [], "annotated": []}
    write_shards, annotate_shards = generate_module._generate_shards, annotate_module._annotate_shards

    def generated(teacher, jobs, shards, *args):  # the response shards this rank was handed
        report["generated"].append(sorted(path.name for path, _ in shards))
        return write_shards(teacher, jobs, shards, *args)

    def annotated(teacher, source, out, settings, strict, indices, *args):
        report["annotated"].append(sorted(indices))
        return annotate_shards(teacher, source, out, settings, strict, indices, *args)

    generate_module._generate_shards, annotate_module._annotate_shards = generated, annotated
    with Ranks.from_environment() as ranks:
        report["rank"], report["world_size"] = ranks.rank, ranks.world_size
        teacher = load_teacher("tiny")
        prompts = load_source("bundled", split="validation").select(range(PROMPTS))
        responses, cache = root / "responses", root / "cache"
        # an interrupted run (3 of 7 shards), then the CLI (python -m tdrl's main) resumes it
        generate_responses(teacher, prompts, responses, stop_after_shards=3, ranks=ranks, **GENERATE)
        report["responses_after_interruption"] = sorted(p.name for p in (responses / "shards").iterdir())
        source_flags = ["--source", "bundled", "--split", "validation", "--limit", str(PROMPTS)]
        assert (
            cli(["generate-responses", "--teacher", "tiny", *source_flags, "--out", str(responses), *flags(GENERATE)])
            == 0
        )
        source = load_source(responses)
        annotate(teacher, source, cache, stop_after_shards=3, ranks=ranks, **ANNOTATE)
        report["cache_after_interruption"] = sorted(p.name for p in (cache / "shards").iterdir())
        if ranks.is_main:  # a damaged shard (its Arrow file cut short) is written again
            arrow = next((cache / "shards" / "shard-00001").glob("data-*.arrow"))
            arrow.write_bytes(arrow.read_bytes()[:100])
        assert (
            cli(["annotate", "--teacher", "tiny", "--source", str(responses), "--out", str(cache), *flags(ANNOTATE)])
            == 0
        )
        # another job holds the directory: every rank gets rank 0's refusal, none waits forever
        held = DirectoryLock(cache, "annotation directory") if ranks.is_main else None
        try:
            if held is not None:
                held.__enter__()
            annotate(teacher, source, cache, ranks=ranks, **ANNOTATE)
        except ConfigError as exc:
            report["locked"] = str(exc)
        finally:
            if held is not None:
                held.__exit__(None, None, None)
        # one record of rank 1's shard is too long under strict: both ranks raise, the others' shards are kept
        rows = source.to_list()
        rows[4]["prompt"] = "word " * 600  # the 5th record: annotation shard 1, rank 1's
        import datasets

        try:
            annotate(teacher, datasets.Dataset.from_list(rows), root / "strict", strict=True, ranks=ranks, **ANNOTATE)
        except DataError as exc:
            report["strict"] = str(exc)
        report["strict_shards"] = sorted(p.name for p in (root / "strict" / "shards").iterdir())
    (root / f"rank-{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
