"""`falcon generate`: decode prompts with the target and a Falcon drafter (or none) from the command line.

    falcon generate --prompt "What is the capital of France?"
    falcon generate --drafter none --prompts prompts.jsonl --max-new-tokens 128 --json

`--prompt` text is sent through the model's chat template as one user turn (`--raw` sends it as is);
`--prompts` reads a JSONL file (MT-Bench `turns`, `prompt` or `messages`; see `data.read_prompts`).
With `--json`, one JSON object per prompt: id, text, token_ids, finish_reason and stats (with `tau`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from falcon_core.resolve import DEFAULT_MODEL

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_DRAFTERS = {DEFAULT_MODEL: "smollm2-135m-falcon-k2"}


def default_drafter(model: str) -> Path | None:
    """The committed default drafter of `model` (models/<name>/), when this checkout has one."""
    name = DEFAULT_DRAFTERS.get(model)
    path = REPO_MODELS / name if name else None
    return path if path is not None and (path / "model.safetensors").is_file() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="falcon generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a user turn, chat template applied unless --raw)")
    src.add_argument("--prompts", type=Path, help="JSONL file of prompts")
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, HF folder, .gguf file or hub id")
    p.add_argument("--drafter", default="default", help="drafter checkpoint folder, 'default' or 'none'")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--tree", default="auto", help="tree name (kmask2_8layer_tree, chain-4, ...) or auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from falcon_core.data import read_prompts
    from falcon_core.generate import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    drafter = args.drafter
    if drafter == "default":
        drafter = default_drafter(args.model)
    try:
        items = read_prompts(args.prompts) if args.prompts else None
        engine = Engine.from_pretrained(
            args.model, drafter, dtype=args.dtype, device=args.device, tree=args.tree
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"falcon generate: {e}", file=sys.stderr)
        return 2
    if items is None:
        kind = "prompt" if args.raw else "messages"
        value = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
        requests = [("0", {kind: value})]
    else:
        requests = [
            (it.id, {"prompt": it.prompt} if it.prompt is not None else {"messages": list(it.messages)})
            for it in items
        ]
    if not args.json:
        print(f"# model {args.model}, drafter {drafter or 'none'}, tree {engine.tree.name}", file=sys.stderr)
    for rid, request in requests:
        try:
            res = engine.generate(
                **request,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                stop=args.stop,
                seed=args.seed,
            )
        except ValueError as e:
            print(f"falcon generate: prompt {rid}: {e}", file=sys.stderr)
            return 2
        if args.json:
            record = {
                "id": rid,
                "text": res.text,
                "token_ids": res.token_ids,
                "finish_reason": res.finish_reason,
                "stats": res.stats.to_dict(),
            }
            print(json.dumps(record), flush=True)
        else:
            print(res.text, flush=True)
            s = res.stats
            print(
                f"# {s.new_tokens} tokens in {s.total_seconds:.2f} s ({s.tokens_per_second:.1f} tok/s), "
                f"tau {s.tau:.2f}, finish {res.finish_reason}",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
