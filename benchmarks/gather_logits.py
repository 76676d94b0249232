"""Candidate logits, three ways, on a real annotated batch (forward + backward of a logsumexp):
one weight row per (state, candidate) ``[R, K, H]``; one product with the batch's distinct ids
``[R, U]`` (what ``tdrl.models.student.gather_logits`` does); full ``[R, V]`` logits. Same process, same
inputs. Not part of ``make bench`` (a few seconds; it backs the figure quoted in the docstring).

    python -m benchmarks.gather_logits --teacher bundled vocab8k
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks.train_speed import annotated_batch, get_teacher


def per_row(h, w, ids):
    return (nn.functional.embedding(ids, w) @ h.unsqueeze(-1)).squeeze(-1)


def distinct(h, w, ids):
    unique, inverse = torch.unique(ids, return_inverse=True)
    return (h @ w[unique].T).gather(-1, inverse)


def full(h, w, ids):
    return (h @ w.T).gather(-1, ids)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="+", default=["bundled", "vocab8k"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    lines = [
        "| vocabulary | states x K | distinct ids | per-row s | distinct-ids s | full-V s | per-row / distinct |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.teacher:
        teacher = get_teacher(name)
        batch = annotated_batch(teacher, 8, 96, 64, 0.8)
        ids = batch["cand_ids"][batch["attention_mask"].bool()]
        w = teacher.model.get_output_embeddings().weight.detach().clone().requires_grad_()
        h = torch.randn(ids.shape[0], w.shape[1], requires_grad=True)
        seconds = {}
        for fn in (per_row, distinct, full, per_row, distinct, full):  # the second round is timed
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn(h, w, ids).logsumexp(-1).sum().backward()
            seconds[fn.__name__] = (time.perf_counter() - start) / args.repeats
        lines.append(
            f"| {teacher.vocab_size:,} | {ids.shape[0]} x {ids.shape[1]} | {torch.unique(ids).numel()} | "
            f"{seconds['per_row']:.3f} | {seconds['distinct']:.3f} | {seconds['full']:.3f} | "
            f"{seconds['per_row'] / seconds['distinct']:.1f}x |"
        )
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
