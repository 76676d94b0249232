"""Environment speed: env steps/s of the KV-cached single and vector envs against a naive env that
re-encodes the whole prefix every step, all in this process, same prompts, same policy.

    python -m benchmarks.env_speed --teacher tiny --steps 200
    python -m benchmarks.env_speed --teacher bundled --steps 64 --num-envs 1 8
"""

from __future__ import annotations

import argparse
import time

from tdrl.cli import SAMPLE_PROMPTS
from tdrl.envs import RandomMaskedPolicy, TokenGenerationEnv, TokenGenerationVectorEnv
from tdrl.models import load_teacher


def steps_per_second(env, steps: int, seed: int = 0) -> float:
    """Sub-environment steps per second over ``steps`` calls of ``env.step`` (autoreset included)."""
    policy = RandomMaskedPolicy(seed=seed)
    vector = hasattr(env, "num_envs")
    obs, _ = env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        actions, _ = policy(obs)  # (actions, extras)
        obs, _, terminated, truncated, _ = env.step(actions)
        if not vector and (terminated or truncated):
            obs, _ = env.reset()
    elapsed = time.perf_counter() - start
    return steps * (env.num_envs if vector else 1) / elapsed


def measure(teacher_name: str, steps: int, num_envs: list[int], max_new_tokens: int, device: str = "cpu") -> list[dict]:
    teacher = load_teacher(teacher_name, device=device)
    prompts = list(SAMPLE_PROMPTS)
    kwargs = dict(max_new_tokens=max_new_tokens, top_k=64, top_p=0.8)
    rows = []
    for n in num_envs:
        for kv in (True, False):
            if n == 1:
                env = TokenGenerationEnv(teacher, prompts, kv_cache=kv, **kwargs)
            else:
                env = TokenGenerationVectorEnv(teacher, prompts, num_envs=n, kv_cache=kv, **kwargs)
            steps_per_s = steps_per_second(env, steps if kv else max(steps // 2, 8))
            rows.append({"teacher": teacher_name, "num_envs": n, "kv_cache": kv, "steps_per_s": steps_per_s})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| teacher | envs | KV-cached steps/s | naive (re-encode) steps/s | ratio |", "|---|---|---|---|---|"]
    by_key = {(r["teacher"], r["num_envs"], r["kv_cache"]): r["steps_per_s"] for r in rows}
    for teacher, n in dict.fromkeys((r["teacher"], r["num_envs"]) for r in rows):
        fast, naive = by_key[(teacher, n, True)], by_key[(teacher, n, False)]
        kind = "single env" if n == 1 else f"vector N={n}"
        lines.append(f"| {teacher} | {kind} | {fast:.1f} | {naive:.1f} | {fast / naive:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="+", default=["tiny", "bundled"])
    parser.add_argument("--steps", type=int, default=96, help="env.step calls per measurement")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu", help="torch device of the teacher")
    args = parser.parse_args(argv)
    rows = []
    for name in args.teacher:
        rows += measure(name, args.steps, args.num_envs, args.max_new_tokens, args.device)
    out = table(rows)
    print(out)
    return out


if __name__ == "__main__":
    main()
