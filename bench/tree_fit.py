"""Fitting the decoding tree to the machine: the node budget that maximises expected tokens per second.

Cost model (one speculative step with tree `t` of `N` nodes):
- *verification cost* `verify(t)`: one target forward of `1 + N` tokens over a ~200-token cache under
  `t`'s tree mask, median of repeats, measured here;
- *drafting cost* `draft(t)`: one `SARDrafter.propose` of `t` (pass 1 over `k + 1` new context
  positions, then every tree pass), median of repeats, measured here;
- *expected tokens per step* `E(t) = falcon_core.tree.expected_accepted(t, acceptance) + 1` (the bonus).
Expected tokens/s = `E(t) / (verify(t) + draft(t))`. For each budget `b`, `t = build_tree(acceptance,
b)` (the tree with the most expected accepted tokens at that size); the fitted budget is the argmax
over the budgets measured. Plain decoding (budget 0: a one-token forward, nothing drafted) and the
published trees are scored by the same model for comparison.

Acceptance (`acceptance[d][r]`, the card's table that `--tree auto` reads): measured by greedy decoding
of held-out prompts through `Engine` with a *probe tree*: a rank-0 chain `D` deep whose every chain node
also has siblings of ranks 1..R-1. At depth d+1, given the chain was accepted down to depth d, it is
the share of steps whose target token was the drafter's rank-r candidate; `build_tree` applies it to
every parent at that depth (rank-0 parents are by far the likeliest ones anyway).

`store_fit(drafter_dir, fit)` writes `acceptance` and `tree_budget` (and the fit's summary under
`tree_fit`) into the checkpoint's card, so `Engine.from_pretrained(..., tree="auto")` builds the fitted
tree; the previous acceptance table, if different, is kept under `tree_fit.replaced_acceptance`.

    falcon bench tree-fit --drafter models/smollm2-135m-falcon-k2 --prompts mtbench --num-prompts 8 \\
        --out bench/results/tree-fit-falcon-k2 [--write-card]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from falcon_core.checkpoint import load_drafter, read_drafter_config, save_drafter, stored_dtype
from falcon_core.draft import DraftPlan, SARDrafter
from falcon_core.drafter import Drafter
from falcon_core.generate import Engine
from falcon_core.masks import with_prefix
from falcon_core.sampling import SamplingParams
from falcon_core.target import DTYPES, TargetModel
from falcon_core.tree import PUBLISHED_SPECS, Tree, TreeBuffers, build_tree, expected_accepted, get_tree

DEFAULT_BUDGETS = (*range(1, 17), 20, 24, 28, 32, 40, 48, 56, 64, 80)
CONTEXT = 200


# ---------------------------------------------------------------------------------------------------
# Acceptance from decoding with a probe tree


def probe_tree(depth: int, ranks: int) -> Tree:
    """A rank-0 chain `depth` deep; every chain position also holds the ranks 1..ranks-1 as leaves."""
    if depth < 1 or ranks < 1:
        raise ValueError(f"probe tree needs depth >= 1 and ranks >= 1, got {depth}, {ranks}")
    paths = [(0,) * d + (r,) for d in range(depth) for r in range(ranks)]
    return Tree.from_paths(f"probe-{depth}x{ranks}", paths)


@dataclass(frozen=True)
class AcceptanceTable:
    acceptance: list[list[float]]
    """[depth][rank]: P(target token = rank-r candidate at depth d+1 | chain accepted to depth d)."""
    events: list[int]
    """Per depth: speculative steps whose chain reached the depth above it (the denominators)."""
    hits: list[list[int]]
    steps: int
    tokens: int


class ProbeEngine(Engine):
    """An `Engine` over a probe tree that counts, per depth, which rank the target's token had."""

    def __init__(self, target: TargetModel, tokenizer: Any, drafter: Drafter, depth: int, ranks: int) -> None:
        super().__init__(target, tokenizer, drafter, probe_tree(depth, ranks), name="probe")
        self.depth, self.ranks = depth, ranks
        node = {self.tree.path(i): i for i in range(self.tree.num_nodes)}
        self.node_of = [[node[(0,) * d + (r,)] for r in range(ranks)] for d in range(depth)]
        self.events = [0] * depth
        self.hits = [[0] * ranks for _ in range(depth)]

    def _verify_step(self, draft, n, cache, tokens, features, params, gen):  # type: ignore[override]
        A, new = super()._verify_step(draft, n, cache, tokens, features, params, gen)
        drafted = draft.tokens.tolist()
        for d in range(self.depth):
            self.events[d] += 1
            if d >= A - 1:  # nothing accepted at depth d+1: the target's token was no candidate
                break
            r = next(r for r in range(self.ranks) if drafted[self.node_of[d][r]] == new[d])
            self.hits[d][r] += 1
            if r:  # a rank r > 0 node is a leaf of the probe tree
                break
        return A, new


def measure_acceptance(
    target: TargetModel,
    tokenizer: Any,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    depth: int = 8,
    ranks: int = 10,
) -> AcceptanceTable:
    """Decode `prompts` greedily with a probe tree; per-depth, per-rank acceptance (module doc)."""
    engine = ProbeEngine(target, tokenizer, drafter, depth, ranks)
    steps = tokens = 0
    for ids in prompts:
        res = engine.generate(input_ids=list(ids), max_new_tokens=max_new_tokens)
        steps += res.stats.speculative_steps
        tokens += len(res.token_ids)
    acceptance = [
        [h / e if e else 0.0 for h in hits] for hits, e in zip(engine.hits, engine.events, strict=True)
    ]
    return AcceptanceTable(acceptance, engine.events, engine.hits, steps, tokens)


# ---------------------------------------------------------------------------------------------------
# Costs measured on this machine


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class CostMeter:
    """Times target verification and drafting of trees after a random `context`-token prefix."""

    def __init__(
        self,
        target: TargetModel,
        drafter: Drafter | None,
        context: int = CONTEXT,
        repeats: int = 7,
        seed: int = 0,
    ) -> None:
        self.target, self.drafter = target, drafter
        self.context, self.repeats = context, repeats
        device = target.embed.weight.device
        g = torch.Generator().manual_seed(seed)
        V = target.config.vocab_size
        self.tokens = torch.randint(0, V, (context + 256,), generator=g).to(device)  # (C+256,)
        self.cache = target.new_cache(context + 256)
        pos = torch.arange(context, device=device)[None]  # (1, C)
        with torch.inference_mode():
            out = target(self.tokens[:context][None], pos, self.cache, 0)
        self.cache.length = context
        self.features = out.hidden[0]  # (C, H)

    @torch.inference_mode()
    def verify(self, tree: Tree) -> float:
        """Median seconds of one target forward of `[bonus] + tree` over the context, under the tree mask."""
        b = TreeBuffers.from_tree(tree, self.features.device)
        n = self.context
        ids = self.tokens[n : n + 1 + tree.num_nodes][None]  # (1, 1+N)
        pos = (n + b.position_offsets)[None]  # (1, 1+N)
        mask = with_prefix(b.mask, n)  # (1+N, n+1+N)
        return _median_seconds(lambda: self.target(ids, pos, self.cache, n, mask), self.repeats)

    @torch.inference_mode()
    def draft(self, tree: Tree) -> float:
        """Median seconds of drafting `tree` (pass 1 over k+1 new positions, then the tree passes)."""
        if self.drafter is None or tree.num_nodes == 0:
            return 0.0
        k = self.drafter.config.block_size
        plan = DraftPlan.build(tree, k, self.features.device)
        sar = SARDrafter(self.drafter, self.target, plan, self.context + 256)
        n, params = self.context, SamplingParams()
        sar.propose(self.features, self.tokens[: n + 1], n, params)  # fills the drafter cache

        def step() -> None:
            sar.cache.length = n - k - 1
            sar.propose(self.features, self.tokens[: n + 1], n, params)

        return _median_seconds(step, self.repeats)


# ---------------------------------------------------------------------------------------------------
# The fit


@dataclass(frozen=True)
class TreeScore:
    """One tree under the cost model."""

    name: str
    budget: int | None
    nodes: int
    depth: int
    expected_tokens: float
    """Expected tokens per step, bonus included."""
    verify_seconds: float
    draft_seconds: float

    @property
    def step_seconds(self) -> float:
        return self.verify_seconds + self.draft_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.expected_tokens / self.step_seconds if self.step_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"step_seconds": self.step_seconds, "tokens_per_second": self.tokens_per_second}


def score(
    tree: Tree,
    acceptance: Sequence[Sequence[float]],
    budget: int | None,
    verify: Callable[[Tree], float],
    draft: Callable[[Tree], float],
) -> TreeScore:
    return TreeScore(
        name=tree.name,
        budget=budget,
        nodes=tree.num_nodes,
        depth=tree.max_depth,
        expected_tokens=expected_accepted(tree, acceptance) + 1.0,
        verify_seconds=verify(tree),
        draft_seconds=draft(tree),
    )


@dataclass(frozen=True)
class TreeFit:
    acceptance: list[list[float]]
    budgets: list[TreeScore]
    """One per budget, in budget order."""
    best: TreeScore
    """The budget with the most expected tokens/s."""
    plain: TreeScore
    """Plain decoding: one token per one-token forward."""
    published: list[TreeScore]

    def to_dict(self) -> dict[str, Any]:
        return {
            "acceptance": self.acceptance,
            "best": self.best.to_dict(),
            "plain": self.plain.to_dict(),
            "published": [s.to_dict() for s in self.published],
            "budgets": [s.to_dict() for s in self.budgets],
        }


def fit_tree(
    acceptance: Sequence[Sequence[float]],
    verify: Callable[[Tree], float],
    draft: Callable[[Tree], float],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    published: Sequence[str] = tuple(PUBLISHED_SPECS),
) -> TreeFit:
    """Score `build_tree(acceptance, b)` for every budget and pick the one with the most tokens/s."""
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be positive node counts, got {list(budgets)}")
    acc = [list(map(float, row)) for row in acceptance]
    rows = [
        score(build_tree(acc, b, name=f"fitted-{b}"), acc, b, verify, draft) for b in sorted(set(budgets))
    ]
    best = max(rows, key=lambda s: s.tokens_per_second)
    plain = score(Tree.chain(0), acc, 0, verify, lambda _t: 0.0)
    pub = [score(get_tree(name), acc, None, verify, draft) for name in published]
    return TreeFit(acc, rows, best, plain, pub)


# ---------------------------------------------------------------------------------------------------
# Into the drafter's card


def store_fit(drafter_dir: str | Path, fit: TreeFit, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the fit into the checkpoint's card (`acceptance`, `tree_budget`, `tree_fit`); weights are
    re-saved unchanged in their stored dtype. Returns the new card."""
    path = Path(drafter_dir)
    _, _, card = read_drafter_config(path)
    ckpt = load_drafter(path, dtype=stored_dtype(path))
    new = dict(card or {})
    old = new.get("acceptance")
    summary: dict[str, Any] = {
        "budget": fit.best.budget,
        "nodes": fit.best.nodes,
        "expected_tokens_per_step": fit.best.expected_tokens,
        "expected_tokens_per_second": fit.best.tokens_per_second,
        "plain_tokens_per_second": fit.plain.tokens_per_second,
        "published": {s.name: s.tokens_per_second for s in fit.published},
        **(extra or {}),
    }
    if old is not None and old != fit.acceptance:
        summary["replaced_acceptance"] = old
    elif "replaced_acceptance" in (new.get("tree_fit") or {}):  # refit on the same table: keep its history
        summary["replaced_acceptance"] = new["tree_fit"]["replaced_acceptance"]
    new.update(acceptance=fit.acceptance, tree_budget=fit.best.budget, tree_fit=summary)
    save_drafter(path, ckpt.drafter, ckpt.config, ckpt.identity, new)
    return new


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="falcon bench tree-fit", description=__doc__.split("\n")[0])
    p.add_argument("--drafter", type=Path, required=True, help="drafter checkpoint folder")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", default="mtbench", help="mtbench, gsm8k or a JSONL file (held-out prompts)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--acceptance",
        choices=["measure", "card"],
        default="measure",
        help="measure on the prompts, or use the card's table",
    )
    p.add_argument("--probe-depth", type=int, default=8)
    p.add_argument("--probe-ranks", type=int, default=10)
    p.add_argument(
        "--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="comma-separated node budgets"
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--context", type=int, default=CONTEXT)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="folder for tree_fit.json")
    p.add_argument("--write-card", action="store_true", help="store the fit in the drafter's card")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bench.cli import load_prompt_sets
    from bench.methods import Models
    from bench.runner import encode
    from falcon_core.resolve import resolve_model

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    models = Models(resolve_model(args.model), args.dtype, name=args.model)
    ckpt = load_drafter(args.drafter, expected_identity=models.identity, dtype=args.dtype)
    drafter = ckpt.drafter.eval()
    table: AcceptanceTable | None = None
    if args.acceptance == "card":
        acceptance = (ckpt.card or {}).get("acceptance")
        if not acceptance:
            print(
                f"falcon bench tree-fit: {args.drafter} has no acceptance in its card; use --acceptance measure"
            )
            return 2
    else:
        items = load_prompt_sets([args.prompts], args.num_prompts)[0].items
        prompts = [encode(models.tokenizer, it) for it in items]
        table = measure_acceptance(
            models.target,
            models.tokenizer,
            drafter,
            prompts,
            args.max_new_tokens,
            args.probe_depth,
            args.probe_ranks,
        )
        acceptance = table.acceptance
    meter = CostMeter(models.target, drafter, args.context, args.repeats)
    budgets = [int(b) for b in args.budgets.split(",")]
    fit = fit_tree(acceptance, meter.verify, meter.draft, budgets)
    record = {
        "what": "tree fit: expected tokens/s = (expected accepted + 1) / (verify + draft), measured costs",
        "drafter": str(args.drafter),
        "k": ckpt.config.block_size,
        "model": args.model,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "context": args.context,
        "repeats": args.repeats,
        "load_average_start": list(load),
        "load_average_end": list(os.getloadavg()),
        "acceptance_source": args.acceptance,
        "acceptance_measurement": asdict(table)
        | {"prompts": args.prompts, "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens}
        if table
        else None,
        **fit.to_dict(),
    }
    print(report_text(record))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tree_fit.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.write_card:
        extra = {"machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads", "dtype": args.dtype}
        store_fit(args.drafter, fit, extra)
        print(f"stored tree_budget {fit.best.budget} and acceptance in {args.drafter}/config.json")
    return 0


def report_text(record: dict[str, Any]) -> str:
    """The fitted tree against plain decoding and the published trees, one line each."""
    lines = [f"tree fit for {record['drafter']} (k = {record['k']}, {record['dtype']}):"]
    rows = [("fitted", record["best"]), ("plain", record["plain"])] + [
        ("published", s) for s in record["published"]
    ]
    for label, s in rows:
        lines.append(
            f"  {label:9s} {s['name']:22s} {s['nodes']:4d} nodes, depth {s['depth']}: "
            f"E[tokens/step] {s['expected_tokens']:.2f}, verify {1e3 * s['verify_seconds']:.1f} ms, "
            f"draft {1e3 * s['draft_seconds']:.1f} ms -> {s['tokens_per_second']:.1f} tokens/s"
        )
    return "\n".join(lines)
