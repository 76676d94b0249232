"""Top-p statistics of the bundled teacher on the bundled prompts: how few tokens hold the mass.

For ``--prompts`` bundled training prompts the teacher samples a response (temperature 1, the full
distribution: no top-k/top-p, so the states are the ones its own distribution visits); at every
response state the script computes the nucleus A_p(s) (top-k first, k = ``--top-k``, then the
smallest prefix with mass >= p), its size and mass for p in {0.5, 0.8, 0.9, 0.95}, and the mass of
the top-7 and top-50 tokens. The paper reports the top-50 tokens holding 96% of the mass and the
top-7 at least 90%.

    python -m benchmarks.topp_stats --prompts 64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tdrl.actions import top_p_subset
from tdrl.data import load_source
from tdrl.models import load_teacher

PS = (0.5, 0.8, 0.9, 0.95)


def state_logits(teacher, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Teacher logits ``[S, V]`` at every state from which it chose a response token."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        responses = teacher.generate(
            chunk, max_new_tokens, do_sample=True, top_k=teacher.vocab_size, top_p=1.0, seed=seed + start
        )
        for prompt, response in zip(chunk, responses):
            ids = teacher.encode_prompt(prompt) + [int(t) for t in response]
            n_prompt = len(ids) - len(response)
            rows.append(teacher.logits(torch.tensor([ids]))[0, n_prompt - 1 : len(ids) - 1])
    return torch.cat(rows)


def statistics(logits: torch.Tensor, top_k: int) -> dict:
    out = {"states": logits.shape[0], "top_k": top_k, "p": {}}
    for p in PS:
        subset = top_p_subset(logits, top_k=top_k, top_p=p)
        size = subset.size().float().cpu().numpy()
        mass = subset.mass().cpu().numpy()
        out["p"][p] = {
            "size_mean": float(size.mean()),
            "size_median": float(np.median(size)),
            "size_p90": float(np.quantile(size, 0.9)),
            "mass_mean": float(mass.mean()),
            "capped": float((size >= top_k).mean()),
        }
    for n in (7, 50):
        mass = top_p_subset(logits, top_k=n, top_p=1.0).mass().cpu().numpy()
        out[f"top{n}"] = {
            "mean": float(mass.mean()),
            "median": float(np.median(mass)),
            "at_least_0.9": float((mass >= 0.9).mean()),
        }
    return out


def table(stats: dict, header: str) -> str:
    k = stats["top_k"]
    lines = [
        header,
        "",
        "| p | mean size of A_p(s) | median | 90th percentile | mean mass inside | states capped at k |",
        "|---|---|---|---|---|---|",
    ]
    for p, s in stats["p"].items():
        lines.append(
            f"| {p} | {s['size_mean']:.2f} | {s['size_median']:.0f} | {s['size_p90']:.0f} | {s['mass_mean']:.3f} | "
            f"{s['capped']:.1%} (k = {k}) |"
        )
    lines += [
        "",
        "| tokens | mean mass | median mass | states where they hold >= 90% |",
        "|---|---|---|---|",
    ]
    for n in (7, 50):
        s = stats[f"top{n}"]
        lines.append(f"| top-{n} | {s['mean']:.3f} | {s['median']:.3f} | {s['at_least_0.9']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="bundled")
    parser.add_argument("--prompts", type=int, default=64, help="bundled training prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=1024, help="candidate cap taken before top-p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of the teacher")
    args = parser.parse_args(argv)
    teacher = load_teacher(args.teacher, device=args.device)
    prompts = load_source("bundled", split="train").select(range(args.prompts))["prompt"]
    stats = statistics(state_logits(teacher, list(prompts), args.max_new_tokens, args.seed), args.top_k)
    out = table(
        stats,
        f"Teacher {args.teacher} (vocabulary {teacher.vocab_size:,}); {args.prompts} bundled training prompts, one "
        f"sampled response each (temperature 1, full distribution, up to {args.max_new_tokens} tokens, seed "
        f"{args.seed}); {stats['states']:,} response states.",
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
