"""`falcon bench`: greedy decoding speed and acceptance of our methods against baselines.

    falcon bench --prompts mtbench --prompts gsm8k --num-prompts 80 \\
        --methods vanilla,hf,hf-pld,eagle,falcon --max-new-tokens 256 --out bench/results/run
    falcon bench tree-fit --drafter models/smollm2-135m-falcon-k2 ...   (see bench/tree_fit.py)
    falcon bench learning-curve --drafter DIR [--drafter DIR ...] --out DIR   (bench/learning_curve.py)
    falcon bench trajectory-tau --drafter A --drafter B --tree chain-4 ...   (bench/trajectory_tau.py)

`--prompts`: `mtbench` (MT-Bench's 80 questions), `gsm8k` (the GSM8K test split) or a JSONL file
(MT-Bench `turns`, `prompt` or `messages`; `falcon_core.data.read_prompts`); repeat it for several
benchmarks. First turns only unless `--multi-turn`. Writes bench.json, bench.md and three PNG plots
into `--out` (bench/report.py); the protocol is in bench/runner.py, the methods in bench/methods.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.methods import METHODS, Models, build_methods
from bench.runner import PromptSet, RunConfig, Runner
from falcon_core.data import Message, PromptItem, gsm8k_path, mtbench_path, read_gsm8k, read_prompts
from falcon_core.resolve import DEFAULT_MODEL
from falcon_core.target import DTYPES


def load_prompt_sets(specs: Sequence[str], num_prompts: int | None = None) -> list[PromptSet]:
    """`mtbench`, `gsm8k` or JSONL files -> named prompt sets (the first `num_prompts` of each)."""
    sets = []
    for spec in specs:
        if spec == "mtbench":
            items = read_prompts(mtbench_path())
        elif spec == "gsm8k":
            qs = read_gsm8k(gsm8k_path())
            items = [PromptItem(q.id, messages=(Message(role="user", content=q.turns[0]),)) for q in qs]
        else:
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"--prompts {spec}: not mtbench, gsm8k or an existing file")
            items = read_prompts(path)
        name = spec if spec in ("mtbench", "gsm8k") else Path(spec).stem
        sets.append(PromptSet(name, tuple(items[:num_prompts] if num_prompts else items)))
    return sets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="falcon bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--prompts", action="append", default=None, help="mtbench, gsm8k or a JSONL file (repeatable)"
    )
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts of each set")
    p.add_argument("--multi-turn", action="store_true", help="every MT-Bench turn, not just the first")
    p.add_argument(
        "--methods", default="vanilla,hf,hf-pld,eagle,falcon", help=f"comma-separated: {','.join(METHODS)}"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--tree", default="auto", help="tree(s) for eagle / falcon, comma-separated (auto, chain-4, ...)"
    )
    p.add_argument(
        "--falcon-drafter", default=None, help="k = 2 drafter (default models/smollm2-135m-falcon-k2)"
    )
    p.add_argument(
        "--eagle-drafter", default=None, help="k = 1 drafter (default models/smollm2-135m-eagle-k1)"
    )
    p.add_argument("--hf-cache", choices=["auto", "dynamic", "static"], default="auto")
    p.add_argument("--warm-up-tokens", type=int, default=32)
    p.add_argument("--no-check", action="store_true", help="skip the equality checks against plain greedy")
    p.add_argument("--tree-fit", type=Path, default=None, help="tree_fit.json to draw in the tree-size plot")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tree-fit"]:
        from bench.tree_fit import main as tree_fit_main

        return tree_fit_main(argv[1:])
    if argv[:1] == ["trajectory-tau"]:
        from bench.trajectory_tau import main as trajectory_tau_main

        return trajectory_tau_main(argv[1:])
    if argv[:1] == ["learning-curve"]:
        from bench.learning_curve import main as learning_curve_main

        return learning_curve_main(argv[1:])
    args = build_parser().parse_args(argv)
    import json

    import torch

    from bench.report import write_report
    from falcon_core.resolve import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        sets = load_prompt_sets(args.prompts or ["mtbench"], args.num_prompts)
        models = Models(resolve_model(args.model), args.dtype, args.device, name=args.model)
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        trees = [t.strip() for t in args.tree.split(",") if t.strip()]
        drafters = {"falcon": args.falcon_drafter, "eagle": args.eagle_drafter}
        methods = build_methods(names, models, drafters, trees, args.hf_cache)
        config = RunConfig(args.max_new_tokens, args.multi_turn, args.warm_up_tokens, not args.no_check)
    except (ValueError, FileNotFoundError) as e:
        print(f"falcon bench: {e}", file=sys.stderr)
        return 2
    for m in methods:
        if hasattr(m, "reason"):
            log(f"skipped {m.name}: {m.reason}")
    results = Runner(methods, models.plain_engine, config, log).run(sets)
    fit = json.loads(args.tree_fit.read_text()) if args.tree_fit else None
    for path in write_report(results, args.out, fit):
        log(f"wrote {path}")
    if not args.quiet:
        print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
