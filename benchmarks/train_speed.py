"""Training speed of the sparse path (cached teacher candidates + subset_logits over A_p(s))
against the full-vocabulary path (the same agent with restrict="none": [N, V] logits and
normalisers over the whole vocabulary), same student, same batch, same process.

    python -m benchmarks.train_speed --teacher bundled --student layers:0,10,20,29 --steps 5
    python -m benchmarks.train_speed --teacher tiny --student tiny
"""

from __future__ import annotations

import argparse
import time

import torch

from tdrl.agents import make_agent
from tdrl.data import collate, load_source
from tdrl.students import load_student
from tdrl.teachers import load_teacher


def annotated_batch(teacher, batch_size: int, response_tokens: int, top_k: int, top_p: float):
    """A real batch: bundled prompts, each followed by another prompt's text as the response."""
    rows = load_source("bundled", split="train").select(range(2 * batch_size)).to_list()
    items = []
    for i in range(batch_size):
        prompt_ids = teacher.encode_prompt(rows[i]["prompt"])
        text = " ".join(r["prompt"] for r in rows[batch_size:])
        response_ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"][i : i + response_tokens]
        ids = torch.tensor([prompt_ids + response_ids])
        ann = teacher.annotate(ids, top_k=top_k, top_p=top_p)
        lo, hi = len(prompt_ids) - 1, ids.shape[1] - 1
        sub = ann.subset[0, lo:hi]
        items.append({
            "prompt_ids": torch.tensor(prompt_ids), "response_ids": torch.tensor(response_ids),
            "cand_ids": sub.ids, "cand_logprobs": sub.logprobs, "cand_mask": sub.mask,
            "action_logprob": ann.token_logprob[0, lo:hi], "reward": ann.reward[0, lo:hi],
            "action_in_cand": sub.contains(torch.tensor(response_ids)), "terminated": False,
        })  # fmt: skip
    return collate(items, teacher.pad_token_id)


def tokens_per_second(agent, batch, steps: int) -> float:
    optimiser = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=1e-5)
    tokens = int(batch["response_mask"].sum())

    def step():
        loss, _ = agent.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        agent.after_update()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens / (time.perf_counter() - start)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="bundled")
    parser.add_argument("--student", default="layers:0,10,20,29")
    parser.add_argument("--agents", nargs="+", default=["bc", "sql", "cql", "iql", "iqlearn", "bd"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    teacher = load_teacher(args.teacher)
    batch = annotated_batch(teacher, args.batch_size, args.response_tokens, top_k=64, top_p=0.8)
    lines = [
        f"student {args.student} (teacher {args.teacher}, vocabulary {teacher.vocab_size}), batch "
        f"{args.batch_size} x {batch['input_ids'].shape[1]} tokens, {int(batch['response_mask'].sum())} response "
        f"tokens per step, K = 64, p = 0.8",
        "",
        "| agent | sparse tokens/s | full-vocabulary tokens/s | ratio |",
        "|---|---|---|---|",
    ]
    for name in args.agents:
        rates = []
        for restrict in ("topp", "none"):
            torch.manual_seed(0)
            student = load_student(args.student, teacher=teacher)
            rates.append(tokens_per_second(make_agent(name, student, restrict=restrict), batch, args.steps))
        lines.append(f"| {name} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[0] / rates[1]:.2f}x |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
