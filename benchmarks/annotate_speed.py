"""Annotation throughput: the bundled teacher in float32 and bfloat16 (same records, same process) with the
cache's disk bytes per response token; then one cache written by 1 and by N processes (``torchrun``, gloo:
each rank annotates every N-th shard, :mod:`tdrl.data.ranks`).

    python -m benchmarks.annotate_speed --records 256
    python -m benchmarks.annotate_speed --dtypes --processes 1 2 --process-teachers tiny   # processes only

Records: bundled training prompts, each answered by the text of later prompts (the teacher's cost
depends on token counts, not on what the tokens say). The processes' time runs from a barrier after
every rank has loaded its teacher to the end of ``annotate`` (rank 0's seal included); the launch's
wall time (start-up, imports, loading) is given beside it. Each N runs with one torch thread a process
(``OMP_NUM_THREADS=1``, torchrun's default for N > 1), and also with the cores shared out (N = 1: every
core) when that is more than one; the speed-up is against the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets

from tdrl.data import ANNOTATION_META, annotate, load_annotations, load_source
from tdrl.models import load_teacher

SETTINGS = {"top_k": 64, "top_p": 0.8, "batch_size": 8}
#: Records per shard in the processes' runs: enough shards for every rank to hold several.
SHARD_SIZE = 16


def records(n: int) -> datasets.Dataset:
    prompts = load_source("bundled", split="train").to_list()
    rows = [
        {"prompt": prompts[i]["prompt"], "response": " ".join(p["prompt"] for p in prompts[i + 1 : i + 4])}
        for i in range(n)
    ]
    return load_source(datasets.Dataset.from_list(rows))


def tokens_of(cache: Path) -> tuple[int, int, int]:
    data = load_annotations(cache)
    tokens = sum(len(p) + len(r) for p, r in zip(data["prompt_ids"], data["response_ids"]))
    return len(data), tokens, sum(len(r) for r in data["response_ids"])


def dtype_table(args) -> str:
    source = records(args.records)
    lines = [
        "| teacher dtype | records | tokens | seconds | tokens/s | response tokens/s | bytes/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in args.dtypes:
        teacher = load_teacher(args.teacher, dtype=dtype, device=args.device)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = annotate(teacher, source, Path(tmp) / "cache", **SETTINGS)
            seconds = time.perf_counter() - start
            n, tokens, response = tokens_of(out)
            per_token = json.loads((out / ANNOTATION_META).read_text())["bytes_per_token"]
        lines.append(
            f"| {dtype} | {n} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} | "
            f"{response / seconds:.0f} | {per_token:.0f} |"
        )
    return "\n".join(lines)


def launch(processes: int, threads: int, teacher: str, source: Path, out: Path, device: str) -> tuple[dict, float]:
    """One ``torchrun`` of :func:`worker` on ``processes`` ranks of ``threads`` torch threads each: rank 0's
    report and the launch's wall time."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "benchmarks.annotate_speed"]
    command += ["--worker", str(source), str(out), "--teacher", teacher, "--device", device]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=root, env=env)
    return json.loads((out / "timing.json").read_text()), time.perf_counter() - start


def runs(processes: list[int]) -> list[tuple[int, int]]:
    """(processes, torch threads each): each N with one thread, and with every core shared out when N is
    smaller than the cores (one process with 1 and with all threads: what the threads alone give)."""
    cores = os.cpu_count() or 1
    out = []
    for n in processes:
        out += [(n, cores // n)] if cores // n > 1 else []
        out.append((n, 1))
    return out


def processes_table(args) -> str:
    lines = [
        "| teacher | processes | torch threads each | records | tokens | seconds | tokens/s | speed-up | launch s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "records.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records(args.process_records).to_list()))
        for teacher in args.process_teachers:
            base, caches = None, []
            for n, threads in runs(args.processes):
                out = Path(tmp) / f"{teacher}-{n}-{threads}"
                report, wall = launch(n, threads, teacher, source, out, args.device)
                count, tokens, _ = tokens_of(out / "cache")
                rate = tokens / report["seconds"]
                base = base or rate
                caches.append(load_annotations(out / "cache").to_list())
                lines.append(
                    f"| {teacher} | {n} | {report['threads']} | {count} | {tokens} | {report['seconds']:.1f} | "
                    f"{rate:.0f} | {rate / base:.2f}x | {wall:.0f} |"
                )
            if any(c != caches[0] for c in caches):
                raise SystemExit(f"the {teacher} caches of {args.processes} processes differ: a bug")
    return "\n".join(lines)


def worker(source: str, out: str, teacher_name: str, device: str) -> None:
    """One rank of :func:`launch`: load, wait for every rank, annotate with the others, time it."""
    import torch

    from tdrl.data import Ranks
    from tdrl.training.config import resolve_device

    with Ranks.from_environment() as ranks:
        teacher = load_teacher(teacher_name, device=resolve_device(device))
        data = load_source(source)
        ranks.on_all(lambda: None)  # every rank loaded: start together
        start = time.perf_counter()
        annotate(teacher, data, Path(out) / "cache", shard_size=SHARD_SIZE, ranks=ranks, **SETTINGS)
        seconds = time.perf_counter() - start
        if ranks.is_main:
            report = {"seconds": seconds, "threads": torch.get_num_threads(), "processes": ranks.world_size}
            (Path(out) / "timing.json").write_text(json.dumps(report))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="bundled")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], help="none: no dtype table")
    parser.add_argument("--device", default="cpu", help="torch device of the teacher (cuda: one GPU per process)")
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2], help="none: no processes table")
    parser.add_argument("--process-teachers", nargs="+", default=["tiny", "bundled"])
    parser.add_argument("--process-records", type=int, default=128)
    parser.add_argument("--worker", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.teacher, args.device)
        return ""
    if args.device.startswith("cuda"):
        import torch

        args.processes = [n for n in args.processes if n <= torch.cuda.device_count()]
    tables = [dtype_table(args)] if args.dtypes else []
    if args.processes:
        tables.append(
            f"One cache written by N processes ({args.process_records} records, float32 teacher, K = 64, p = 0.8, "
            f"{SHARD_SIZE} records a shard; the caches are checked identical), {os.cpu_count()} CPU cores:\n\n"
            + processes_table(args)
        )
    out = "\n\n".join(tables)
    print(out)
    return out


if __name__ == "__main__":
    main()
