"""Tau of several drafters on the same greedy trajectories: a paired, timing-free acceptance benchmark.

    falcon bench trajectory-tau --drafter A --drafter B [--tree chain-4] --prompts mtbench --prompts gsm8k
        --num-prompts 80 --max-new-tokens 128 --out DIR

In fp32, speculative greedy decoding emits exactly the target's plain greedy continuation, whatever the
drafter (tests/falcon_core). So the fp32 tau of a drafter on a prompt can be measured without the target's
verification forwards: decode the plain greedy continuation once (batched, `greedy_batch`), take the
target's features of the whole sequence from one forward, then replay decoding: at context length n
the drafter proposes its tree from the features and tokens of positions [0, n) (through the same
`SARDrafter` the engine uses), the longest tree path agreeing with the continuation is accepted, and
n advances by the accepted length plus the bonus token, as one verification step would. Tau is the
decoded tokens after the prefill's first one over the steps taken, as `GenerationStats.tau`.

Every drafter meets the same trajectories, so per-prompt differences are paired: the report gives the
mean difference of each drafter against the first with a 95% bootstrap interval over prompts. No
timing is involved, so this runs on a loaded machine without harm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from falcon_core.resolve import DEFAULT_MODEL


def replay(sar: Any, tree: Any, features: torch.Tensor, tokens: torch.Tensor, P: int, max_new: int) -> dict:
    """Replay greedy speculative decoding of one prompt on its known continuation.

    features (L, H): target features of the whole sequence; tokens (L+1,) long: prompt (P tokens), then
    the greedy continuation. Give the continuation `max_new + tree depth` tokens (or up to its EOS):
    like the engine, the last step may accept past `max_new` and those tokens count in `decoded` (the
    engine's `GenerationStats.decode_tokens`). Returns steps, decoded tokens and accepted per depth.
    """
    from falcon_core.sampling import SamplingParams

    L = tokens.shape[0] - 1  # index of the last known token
    end = min(P + max_new - 1, L)  # decoding stops once the token at `end` is known
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(i)
    params = SamplingParams()
    n, steps, decoded = P, 0, 0
    accepted_per_depth = [0] * tree.max_depth
    while n < end:
        draft = sar.propose(features[:n], tokens[: n + 1], n, params)
        depth = 0
        if draft is not None:  # None: context shorter than a block, the engine takes a plain step
            node = -1
            while depth < tree.max_depth and n + depth + 1 < L:  # the bonus token must be known too
                want = int(tokens[n + depth + 1])
                nxt = [c for c in children.get(node, []) if int(draft.tokens[c]) == want]
                if not nxt:
                    break
                node, depth = nxt[0], depth + 1
                accepted_per_depth[depth - 1] += 1
        n += depth + 1
        steps += 1
        decoded += depth + 1
    return {"steps": steps, "decoded": decoded, "accepted_per_depth": accepted_per_depth}


def bootstrap_ci(diffs: Sequence[float], reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `diffs`."""
    d = torch.tensor(list(diffs), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (reps, d.numel()), generator=g)
    means = d[idx].mean(dim=1).sort().values
    return float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="falcon bench trajectory-tau", description=__doc__.split("\n\n")[0])
    p.add_argument("--drafter", action="append", required=True, help="drafter folder (repeatable)")
    p.add_argument("--label", action="append", default=None, help="a name per --drafter")
    p.add_argument("--tree", default="chain-4", help="tree name, or auto (each drafter's card)")
    p.add_argument("--prompts", action="append", default=None, help="mtbench, gsm8k or JSONL (repeatable)")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batched greedy pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    labels = args.label or [Path(d).name for d in args.drafter]
    if len(labels) != len(args.drafter):
        p.error("give one --label per --drafter, or none")

    from transformers import AutoTokenizer

    from bench.cli import load_prompt_sets
    from bench.runner import encode
    from falcon_core.batch_greedy import greedy_batch
    from falcon_core.checkpoint import TargetIdentity, load_drafter
    from falcon_core.draft import DraftPlan, SARDrafter
    from falcon_core.generate import select_tree
    from falcon_core.resolve import resolve_model
    from falcon_core.target import load_target

    torch.set_num_threads(args.threads)
    t0 = time.time()
    folder = resolve_model(args.model)
    target = load_target(folder, dtype="fp32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    identity = TargetIdentity.of(args.model, target.config, tokenizer)
    eos = sorted(set(target.config.eos_token_ids) | {tokenizer.eos_token_id} - {None})
    drafters = []
    for path in args.drafter:
        ckpt = load_drafter(path, expected_identity=identity, dtype="fp32")
        tree = select_tree(args.tree, ckpt.card)
        drafters.append((ckpt, tree, DraftPlan.build(tree, ckpt.config.block_size)))

    depth = max(tree.max_depth for _, tree, _ in drafters)
    rows: list[dict[str, Any]] = []
    for pset in load_prompt_sets(args.prompts or ["mtbench"], args.num_prompts):
        prompts = [encode(tokenizer, item) for item in pset.items]
        for b in range(0, len(prompts), args.batch_size):
            chunk = prompts[b : b + args.batch_size]
            outs = greedy_batch(target, chunk, args.max_new_tokens + depth, eos)
            for item, ids, out in zip(pset.items[b : b + args.batch_size], chunk, outs, strict=True):
                row: dict[str, Any] = {"benchmark": pset.name, "id": item.id, "prompt_tokens": len(ids),
                                       "new_tokens": min(len(out), args.max_new_tokens), "drafters": {}}  # fmt: skip
                seq = torch.tensor(ids + out)  # (L+1,)
                with torch.inference_mode():
                    feats = target(seq[None, :-1], torch.arange(seq.numel() - 1)[None]).hidden[0]  # (L, H)
                    for label, (ckpt, tree, plan) in zip(labels, drafters, strict=True):
                        sar = SARDrafter(ckpt.drafter, target, plan, seq.numel() + plan.scratch_rows)
                        r = replay(sar, tree, feats, seq, len(ids), args.max_new_tokens)
                        r["tau"] = r["decoded"] / r["steps"] if r["steps"] else None
                        row["drafters"][label] = r
                rows.append(row)
            print(f"{pset.name}: {min(b + args.batch_size, len(prompts))}/{len(prompts)} prompts "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip

    summary = summarize(rows, labels)
    meta = {
        "what": "fp32 tau of drafters replayed on the target's plain greedy continuations (paired)",
        "model": args.model,
        "tree": {label: tree.name for label, (_, tree, _) in zip(labels, drafters, strict=True)},
        "tree_nodes": {label: tree.num_nodes for label, (_, tree, _) in zip(labels, drafters, strict=True)},
        "drafters": dict(zip(labels, args.drafter, strict=True)),
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trajectory_tau.json").write_text(
        json.dumps({**meta, "summary": summary, "prompts": rows}, indent=1) + "\n"
    )
    (args.out / "trajectory_tau.md").write_text(markdown(meta, summary, labels))
    print((args.out / "trajectory_tau.md").read_text())
    return 0


def summarize(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Per benchmark and overall: tau (tokens over steps, pooled), per-prompt mean, and each drafter's
    paired mean difference of per-prompt tau against the first drafter with a 95% bootstrap interval."""
    out: dict[str, Any] = {}
    groups = [*sorted({r["benchmark"] for r in rows}), "all"]
    for g in groups:
        sel = [
            r for r in rows if g in ("all", r["benchmark"]) and all(r["drafters"][x]["steps"] for x in labels)
        ]
        if not sel:
            continue
        entry: dict[str, Any] = {"prompts": len(sel)}
        for x in labels:
            steps = sum(r["drafters"][x]["steps"] for r in sel)
            decoded = sum(r["drafters"][x]["decoded"] for r in sel)
            acc = [sum(r["drafters"][x]["accepted_per_depth"][d] for r in sel) / steps
                   for d in range(len(sel[0]["drafters"][x]["accepted_per_depth"]))]  # fmt: skip
            entry[x] = {"tau": decoded / steps, "acceptance_per_depth": acc}
            if x != labels[0]:
                diffs = [r["drafters"][x]["tau"] - r["drafters"][labels[0]]["tau"] for r in sel]
                lo, hi = bootstrap_ci(diffs)
                wins = sum(d > 0 for d in diffs)
                entry[x]["paired_diff_vs_" + labels[0]] = {"mean": sum(diffs) / len(diffs), "ci95": [lo, hi],
                                                           "prompts_higher": wins,
                                                           "prompts_lower": sum(d < 0 for d in diffs)}  # fmt: skip
        out[g] = entry
    return out


def markdown(meta: dict[str, Any], summary: dict[str, Any], labels: Sequence[str]) -> str:
    lines = [f"# Tau on shared greedy trajectories (fp32, {meta['max_new_tokens']} new tokens)", "",
             "| benchmark | prompts | " + " | ".join(f"{x} tau" for x in labels)
             + "".join(f" | {x} - {labels[0]} (95% CI) | higher / lower" for x in labels[1:]) + " |",
             "|---" * (2 + len(labels) + 2 * (len(labels) - 1)) + "|"]  # fmt: skip
    for g, e in summary.items():
        cells = [g, str(e["prompts"])] + [f"{e[x]['tau']:.3f}" for x in labels]
        for x in labels[1:]:
            d = e[x]["paired_diff_vs_" + labels[0]]
            cells += [f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                      f"{d['prompts_higher']} / {d['prompts_lower']}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Trees: " + ", ".join(f"{x}: {meta['tree'][x]} ({meta['tree_nodes'][x]} nodes)" for x in labels),
              "Drafters: " + ", ".join(f"{x} = `{p}`" for x, p in meta["drafters"].items()), ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
