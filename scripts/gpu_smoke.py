"""`make gpu-smoke`: the GPU path end to end, in bfloat16, on a CUDA machine.

1. `tdrl train` (bd, the bundled teacher and a 4-layer student, `--device cuda --mixed-precision bf16`),
   interrupted by nothing, then resumed for a few more steps from its last checkpoint;
2. `tdrl eval` of the run on cuda;
3. `make bench-quick`'s benchmarks on cuda (training step in bf16, env, top-p statistics, the smoke table).

Each step prints its command; the first failure stops the script with its exit status. Needs a CUDA
build of torch (the Makefile's `gpu-smoke` target makes a venv that reuses the machine's torch).
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch


def run(*argv: str) -> None:
    print("+", " ".join(argv), flush=True)
    start = time.perf_counter()
    code = subprocess.call(list(argv))
    print(f"  ({time.perf_counter() - start:.0f} s, exit {code})", flush=True)
    if code:
        sys.exit(code)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu-smoke needs a CUDA GPU and a CUDA build of torch: run it on a GPU machine")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    tdrl = [sys.executable, "-m", "tdrl.cli"]
    out = "runs/gpu-smoke/train"
    common = ["--device", "cuda", "--mixed-precision", "bf16", "--out", out]
    train = (
        "train --agent bd --teacher bundled --student layers:0,10,20,29 --train-prompts 64 --steps 12 --eval-every 6 "
        "--checkpoint-every 6 --eval-prompts 8 --test-prompts 8 --overwrite"
    )
    run(*tdrl, *train.split(), *common)
    run(*tdrl, "train", "--resume", out, "--steps", "16")
    run(*tdrl, "eval", "--checkpoint", out, "--device", "cuda", "--prompts", "8", "--seeds", "0")
    bench = "benchmarks.run --quick --device cuda --mixed-precision bf16 --out runs/gpu-smoke/RESULTS-quick.md"
    run(sys.executable, "-m", *bench.split())
    print("gpu-smoke passed: runs/gpu-smoke/", flush=True)


if __name__ == "__main__":
    main()
