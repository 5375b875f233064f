"""Hidden-state caching throughput against the raw target forward, side by side in one run.

    python bench/cache_throughput.py [--records 120] [--max-seq-len 512] [--threads 2]

1. Raw: the same records, rendered and batched exactly as the pipeline does (`length_batches`), run
   through `TargetModel.forward` in this process after one untimed warm-up pass (a cold process builds
   kernels for every new shape); only the forward calls are timed: the steady-state ideal.
2. Cached: `cache_hidden_states` on the same records into a temporary folder, on a local Ray whose
   target actor gets the same thread count. Three figures: steady state (the actor's time on its shards:
   gathering records, forward, serialization, sha256, writes; what a long run tends to), the shard
   phase (plus actor start, model load and manifest updates) and end to end (plus Ray start, read,
   render and planning). The fixed costs weigh on small runs: measure with enough tokens.
3. Raw again after each cached run (`--repeats` alternations), so drift in the machine's load shows;
   each ratio uses the mean of the raw runs either side of its cached run; medians are reported.
Tokens are real (unpadded) tokens. Writes `bench/results/cache_throughput.json` and appends one
Markdown line to `bench/results/cache_throughput.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def raw_forward(target: Any, records: list, batch_size: int, batch_tokens: int) -> dict:
    """Tokens/s of the bare target forward over `records`, batched as `ShardStage` batches them."""
    import numpy as np
    import torch

    from pipelines.stages import length_batches

    lengths = [r.input_ids.shape[0] for r in records]
    no_logits = torch.empty(0, dtype=torch.long)
    seconds = 0.0
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_size, batch_tokens):
            B, T = len(batch), lengths[batch[0]]
            ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.from_numpy(records[i].input_ids.astype(np.int64))
            positions = torch.arange(T).expand(B, T)  # (B, T)
            start = time.perf_counter()
            target(ids, positions, logits_index=no_logits)
            seconds += time.perf_counter() - start
    tokens = sum(lengths)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--records", type=int, default=120, help="first N ShareGPT conversations")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--shard-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=1, help="raw / cached alternations (medians reported)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from falcon_core.data import read_sharegpt
    from falcon_core.resolve import resolve_model
    from falcon_core.target import load_target
    from pipelines.cache_hidden_states import CacheConfig, cache_hidden_states
    from pipelines.stages import render_record

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    conversations = read_sharegpt(max_records=args.records).conversations
    rendered = [render_record(tokenizer, c.as_dicts(), args.max_seq_len) for c in conversations]
    records = [r for r in rendered if not r.skip]
    torch.set_num_threads(args.threads)
    target = load_target(model_path, dtype=args.dtype)
    forward_args = (target, records, args.batch_size, args.batch_tokens)
    raw_forward(*forward_args)  # warm-up: the first forward of each shape builds its kernels
    load_before = os.getloadavg()

    raws = [raw_forward(*forward_args)]
    print(f"raw forward: {raws[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="falcon-cache-bench-") as tmp:
            config = CacheConfig(
                input="sharegpt", output=str(Path(tmp) / "cache"), model=args.model,
                max_records=args.records, max_seq_len=args.max_seq_len, shard_tokens=args.shard_tokens,
                dtype=args.dtype, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                threads_per_actor=args.threads,
            )  # fmt: skip
            summary = cache_hidden_states(config)
        if summary.tokens_written != raws[0]["tokens"]:
            raise RuntimeError(
                f"the pipeline cached {summary.tokens_written} tokens, raw ran {raws[0]['tokens']}"
            )
        raws.append(raw_forward(*forward_args))
        print(f"raw forward: {raws[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        raw = (raws[-2]["tokens_per_s"] + raws[-1]["tokens_per_s"]) / 2  # the raw runs either side
        runs.append(
            {
                "raw_tokens_per_s": raw,
                "cached_steady_tokens_per_s": summary.tokens_written / summary.work_seconds,
                "cached_shard_phase_tokens_per_s": summary.tokens_per_second,
                "cached_end_to_end_tokens_per_s": summary.tokens_written / summary.seconds,
                "steady_ratio": summary.tokens_written / summary.work_seconds / raw,
                "shard_phase_ratio": summary.tokens_per_second / raw,
                "end_to_end_ratio": summary.tokens_written / summary.seconds / raw,
                "pipeline_seconds": {
                    "total": summary.seconds,
                    "shard_phase": summary.shard_seconds,
                    "actor_work": summary.work_seconds,
                },
            }
        )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    raw, steady, shard_phase, end_to_end = (
        median("raw_tokens_per_s"),
        median("cached_steady_tokens_per_s"),
        median("cached_shard_phase_tokens_per_s"),
        median("cached_end_to_end_tokens_per_s"),
    )
    result = {
        "bench": "cache_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "records": len(records),
        "tokens": raws[0]["tokens"],
        "raw_forward": raws,
        "runs": runs,
        "median_raw_tokens_per_s": raw,
        "median_steady_ratio": median("steady_ratio"),
        "median_shard_phase_ratio": median("shard_phase_ratio"),
        "median_end_to_end_ratio": median("end_to_end_ratio"),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cache_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    line = (
        f"| {result['date']} | {os.cpu_count()} CPUs, {args.threads} threads, {args.dtype} | "
        f"{len(records)} records, {raws[0]['tokens']} tokens (<= {args.max_seq_len}), {args.repeats} repeat(s) | "
        f"raw {raw:.0f} tok/s | cached {steady:.0f} tok/s steady ({100 * result['median_steady_ratio']:.0f}%), "
        f"{shard_phase:.0f} tok/s shard phase "
        f"({100 * result['median_shard_phase_ratio']:.0f}%), {end_to_end:.0f} tok/s end to end "
        f"({100 * result['median_end_to_end_ratio']:.0f}%) | {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} |\n"
    )
    md = args.out_dir / "cache_throughput.md"
    if not md.exists():
        md.write_text(
            "| date | machine | data | raw forward | cached (hidden-state pipeline) | load avg |\n|---|---|---|---|---|---|\n"
        )
    with md.open("a") as f:
        f.write(line)
    print(line, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
