"""Overhead floor of speculation: `Engine` with a random (untrained) drafter against plain decoding.

A random drafter's guesses are (almost) never accepted, so every step pays drafting + a tree-sized
verification for one token: the ratio plain / speculative time is the worst case the method can cost.
Both run in one process on the same prompts, interleaved per prompt, warm-up excluded.

    python -m bench.overhead --prompts 8 --max-new-tokens 64 --tree chain-4 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from falcon_core.data import read_mtbench
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.generate import Engine
from falcon_core.tree import get_tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tree", default="chain-4")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    plain = Engine.from_pretrained(dtype=args.dtype)
    torch.manual_seed(0)
    cfg = DrafterConfig.from_target(plain.target.config, block_size=args.k)
    drafter = Drafter(cfg).to(plain.target.embed.weight.dtype).eval()
    spec = Engine(plain.target, plain.tokenizer, drafter, get_tree(args.tree))
    questions = read_mtbench()[: args.prompts]
    messages = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    kw = {"max_new_tokens": args.max_new_tokens}
    plain.generate(messages=messages[0], max_new_tokens=8)  # warm-up
    spec.generate(messages=messages[0], max_new_tokens=8)
    rows = []
    for m in messages:
        t0 = time.perf_counter()
        a = plain.generate(messages=m, **kw)
        t1 = time.perf_counter()
        b = spec.generate(messages=m, **kw)
        t2 = time.perf_counter()
        rows.append(
            {
                "tokens": len(a.token_ids),
                "plain_s": t1 - t0,
                "spec_s": t2 - t1,
                "equal": a.token_ids == b.token_ids,
                "tau": b.stats.tau,
            }
        )
    plain_s = sum(r["plain_s"] for r in rows)
    spec_s = sum(r["spec_s"] for r in rows)
    result = {
        "what": "plain decode time / speculative decode time with a random drafter (overhead floor)",
        "ratio": plain_s / spec_s,
        "plain_tokens_per_s": sum(r["tokens"] for r in rows) / plain_s,
        "spec_tokens_per_s": sum(r["tokens"] for r in rows) / spec_s,
        "tree": args.tree,
        "k": args.k,
        "dtype": args.dtype,
        "prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
