"""Annotation throughput of the bundled teacher in float32 and bfloat16 (same records, same process),
and the cache's disk bytes per response token.

    python -m benchmarks.annotate_speed --records 256

Records: bundled training prompts, each answered by the text of later prompts (the teacher's
cost depends on token counts, not on what the tokens say).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets

from tdrl.data import ANNOTATION_META, annotate, load_annotations, load_source
from tdrl.models import load_teacher


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="bundled")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="torch device of the teacher")
    args = parser.parse_args(argv)
    prompts = load_source("bundled", split="train").to_list()
    rows = [
        {"prompt": prompts[i]["prompt"], "response": " ".join(p["prompt"] for p in prompts[i + 1 : i + 4])}
        for i in range(args.records)
    ]
    source = load_source(datasets.Dataset.from_list(rows))
    lines = [
        "| teacher dtype | records | tokens | seconds | tokens/s | response tokens/s | bytes/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in args.dtypes:
        teacher = load_teacher(args.teacher, dtype=dtype, device=args.device)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = annotate(teacher, source, Path(tmp) / "cache", top_k=64, top_p=0.8, batch_size=8)
            seconds = time.perf_counter() - start
            data = load_annotations(out)
            tokens = sum(len(p) + len(r) for p, r in zip(data["prompt_ids"], data["response_ids"]))
            response = sum(len(r) for r in data["response_ids"])
            per_token = json.loads((out / ANNOTATION_META).read_text())["bytes_per_token"]
        lines.append(
            f"| {dtype} | {len(data)} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} | "
            f"{response / seconds:.0f} | {per_token:.0f} |"
        )
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
