"""The annotation cache's layouts: bytes per response token, and KD / BD trained on each.

    python -m benchmarks.cache_layout                      # budget cpu: bundled teacher, 3 seeds
    python -m benchmarks.cache_layout --budget smoke       # tiny models, a minute
    python -m benchmarks.cache_layout --bytes-only         # the byte table alone

The bundled training responses of the budget (benchmarks/reproduce.py) are annotated once losslessly
(the compact layout keeping the whole top-K as float32: the information of the full layout of
schema 2). Every other layout is that cache rewritten (:func:`tdrl.data.layout.recode`, which writes
what ``tdrl annotate`` writes with those settings; tests/test_data.py checks it), and the full layout
itself by :func:`tdrl.data.layout.full_layout`. The default layout is the cache ``tdrl train`` builds
for the bundled data.

Training: the budget's warm start, then KD (``bc:mode=kd``) and BD (``bd``, its default) for the
budget's steps and seeds on the full layout (today's reference) and on the default compact layout, in
the same process; test Rouge-L (sampled and greedy) on the budget's held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import reproduce
from tdrl.data import ANNOTATION_META, annotate, load_annotations, load_source
from tdrl.data.bundled import KEEP_TOP_P, bundled_data_dir, prepare_bundled_data
from tdrl.data.layout import full_layout, recode
from tdrl.data.writing import dir_bytes, settings_fingerprint
from tdrl.integrity import write_json_atomic, write_manifest
from tdrl.models import load_teacher
from tdrl.training.warmstart import warm_start, warm_start_config

#: (label, keep_top_p, logprob dtype) of the compact layouts measured; None: the full layout of schema 2.
LAYOUTS = [
    ("full (schema 2: K-wide int32 ids, float32 log-probs, bool mask)", None, None),
    ("compact, whole top-K, float32 (lossless)", 1.0, "float32"),
    ("compact, whole top-K, float16", 1.0, "float16"),
    ("compact, to mass 0.99, float16", 0.99, "float16"),
    ("compact, to mass 0.95, float16", 0.95, "float16"),
    ("compact, to mass 0.9, float16 (default)", KEEP_TOP_P, "float16"),
    ("compact, to mass 0.9, float32", KEEP_TOP_P, "float32"),
    ("compact, A_p(s) only (p = 0.8), float16", 0.8, "float16"),
]
SPECS = [("KD", "bc:mode=kd"), ("BD (default)", "bd")]


def write_cache(data, out: Path, meta: dict) -> Path:
    """``data`` as a one-shard annotation cache at ``out`` with metadata ``meta`` (sealed like annotate's)."""
    shutil.rmtree(out, ignore_errors=True)
    shard = out / "shards" / "shard-00000"
    data.save_to_disk(str(shard))
    (shard / "tdrl-shard.json").write_text(json.dumps({"skipped": {}, "records": len(data)}))
    write_manifest(shard)
    write_json_atomic(out / ANNOTATION_META, {**meta, "shards": {shard.name: len(data)}, "complete": True})
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(reproduce.BUDGETS), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, help="override the budget's number of seeds")
    parser.add_argument("--out", help="default: runs/cache-layout-<budget>")
    parser.add_argument("--bytes-only", action="store_true", help="the byte table, no training")
    args = parser.parse_args(argv)
    budget = dict(reproduce.BUDGETS[args.budget])
    out = Path(args.out or f"runs/cache-layout-{args.budget}")
    out.mkdir(parents=True, exist_ok=True)
    base = reproduce.base_config(budget, args.device, out)
    teacher = load_teacher(base.teacher, dtype=base.teacher_dtype, device=args.device)
    d = base.data
    default_dir = prepare_bundled_data(
        teacher,
        train_prompts=d.train_prompts,
        response_tokens=d.response_tokens,
        top_k=d.annotation_top_k,
        top_p=d.annotation_top_p,
        progress=False,
    )
    responses = bundled_data_dir(teacher, d.train_prompts, d.response_tokens, d.annotation_top_k, d.annotation_top_p)
    lossless = annotate(
        teacher,
        load_source(responses / "responses"),
        out / "layouts" / "lossless",
        top_k=d.annotation_top_k,
        top_p=d.annotation_top_p,
        keep_top_p=1.0,
        logprob_dtype="float32",
        shard_size=256,
    )
    meta = json.loads((lossless / ANNOTATION_META).read_text())
    settings, tokens = meta["settings"], meta["statistics"]["tokens"]
    width = min(settings["top_k"], settings["vocab_size"])
    data = load_annotations(lossless)
    lines = [
        f"Bundled teacher responses of budget `{args.budget}`: {len(data)} records, {tokens} response tokens, "
        f"K = {width}, p = {settings['top_p']}; mean |A_p(s)| {meta['statistics']['support_size']:.2f}.",
        "",
        "| layout | candidates kept per token | bytes/token | vs full | re-cuts up to p |",
        "|---|---|---|---|---|",
    ]
    dirs, full_bytes = {}, None
    for label, keep, dtype in LAYOUTS:
        if keep is None:
            target = out / "layouts" / "full"
            layout_meta = {**meta, "settings": {k: v for k, v in settings.items() if k != "keep_top_p"}}
            layout_meta["settings"].update(schema=2, logprob_dtype="float32")
            layout_meta["fingerprint"] = settings_fingerprint(layout_meta["settings"])
            if not (target / ANNOTATION_META).is_file():  # written by an earlier call: reused
                write_cache(full_layout(data, width), target, layout_meta)
        else:
            target = out / "layouts" / f"keep{keep:g}-{dtype}"
            layout_meta = {**meta, "settings": {**settings, "keep_top_p": keep, "logprob_dtype": dtype}}
            layout_meta["fingerprint"] = settings_fingerprint(layout_meta["settings"])  # one per layout
            if not (target / ANNOTATION_META).is_file():
                write_cache(recode(data, width, settings["vocab_size"], keep, dtype), target, layout_meta)
        per_token = dir_bytes(target / "shards") / tokens
        full_bytes = full_bytes or per_token
        counts = [np.sum(c) for c in load_annotations(target)["cand_count"]] if keep is not None else None
        kept = sum(counts) / tokens if counts else width
        reach = "1.0" if keep in (None, 1.0) else f"{keep:g}"
        lines.append(f"| {label} | {kept:.1f} | {per_token:.0f} | {per_token / full_bytes:.2f} | {reach} |")
        dirs[label] = target
    default_bytes = dir_bytes(default_dir / "shards") / tokens
    lines += [
        "",
        f"The default cache `tdrl train` builds for these data (annotated directly): {default_bytes:.0f} bytes/token.",
    ]
    if not args.bytes_only:
        lines += ["", training_table(budget, base, teacher, out, dirs, args)]
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return text


def training_table(budget, base, teacher, out: Path, dirs: dict, args) -> str:
    """KD and BD on the full and the default layout: the budget's warm start, steps and seeds."""
    store_path = out / "records.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    recipe = budget.get("warm_start") or {"warmup_steps": max(1, budget["warm_start_steps"] // 10)}
    warm_config = warm_start_config(base, budget["warm_start_steps"], budget["warm_start_lr"], recipe)
    path, _ = warm_start(warm_config, out / "warm-start", teacher=teacher, progress=False)
    base = base.replace(student=str(path))
    seeds = range(args.seeds or budget["seeds"])
    layouts = [
        (LAYOUTS[0][0], "full layout"),
        (next(lb for lb, keep, _ in LAYOUTS if keep == KEEP_TOP_P), "default layout"),
    ]
    records = {(spec, short): [] for _, spec in SPECS for _, short in layouts}
    for s in seeds:  # seed by seed, so that a call cut short leaves every layout and agent with the same seeds
        for label, spec in SPECS:
            for layout, short in layouts:
                layout_base = base.replace(data=str(dirs[layout]))
                run = reproduce.run_one(
                    f"{label}, {short}", spec, s, layout_base, teacher, store, out, prefix=f"{short[:4]}-"
                )
                records[spec, short].append(run)
    rows = [(f"{label}, {short}", records[spec, short]) for label, spec in SPECS for _, short in layouts]
    return reproduce.table(rows)


if __name__ == "__main__":
    main()
