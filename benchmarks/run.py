"""`make bench`: run the benchmarks and write benchmarks/RESULTS.md.

    python -m benchmarks.run            # env speed (tiny + bundled) and training speed (layers student)
    python -m benchmarks.run --quick    # tiny models only (about a minute)

Every figure is a ratio against a baseline measured in the same process, never a timed assertion.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from benchmarks import env_speed, train_speed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    teachers = ["tiny"] if args.quick else ["tiny", "bundled"]
    sections = [
        "# tdrl benchmark results",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}. Regenerate with `make bench` (or `make bench-quick`).",
        "",
        "## Environment speed: KV-cached env vs naive re-encoding env",
        "",
        env_speed.main(["--teacher", *teachers, "--num-envs", "1", "8", "32", "--steps", "32" if args.quick else "64"]),
        "",
        "## Training speed: sparse A_p(s) path vs full-vocabulary path",
        "",
    ]
    if args.quick:
        sections.append(train_speed.main(["--teacher", "tiny", "--student", "tiny", "--steps", "3"]))
    else:
        sections.append(train_speed.main(["--teacher", "bundled", "--student", "layers:0,10,20,29", "--steps", "3"]))
    sections += ["", f"Total benchmark wall time: {time.perf_counter() - started:.0f} s.", ""]
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
