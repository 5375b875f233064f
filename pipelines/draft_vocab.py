"""Give a drafter a draft vocabulary: the n most frequent answer tokens of a hidden-state cache.

    python -m pipelines.draft_vocab --drafter DIR --cache DIR|s3://... --size 8192
        [--model SPEC] [--heldout-records 48] [--max-len 448] [--out DIR]

A drafter with a draft vocabulary (`DrafterConfig.draft_vocab_size`, FR-Spec and EAGLE-3 style) reads
n rows of the target's lm_head per drafter pass instead of V; verification keeps the whole vocabulary,
so output is unchanged. The ids are exactly those `objective.vocab_subset = n` trains over: the
loss-masked tokens of the cache's training records (all but the last `heldout-records`, each cut at
`max-len` tokens), most frequent first, the target's EOS ids always included. For a drafter trained
with that subset on that cache (distill does this itself since the draft vocabulary existed) this
restores its training vocabulary. The checkpoint is rewritten atomically (to `--out`, or in place),
and its card records where the vocabulary came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from falcon_core.checkpoint import load_drafter, save_drafter, stored_dtype
from falcon_core.drafter import Drafter
from falcon_core.resolve import DEFAULT_MODEL, resolve_model
from falcon_core.target import TargetConfig
from pipelines.csgd import token_counts, training_vocabulary
from pipelines.hidden_cache import HiddenCacheReader
from pipelines.train import RecordSplit, read_records


def cache_vocabulary(
    cache_url: str,
    size: int,
    eos_ids: tuple[int, ...],
    heldout_records: int,
    max_len: int,
    reader_target: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(size,) ascending ids of the most frequent loss-masked tokens of the cache's training records,
    and a description for the card. `reader_target`: the drafter's TargetIdentity (the cache must match)."""
    reader = HiddenCacheReader(cache_url, expected_target=reader_target)
    split = RecordSplit.build(reader.num_records, heldout_records, 1)
    records = read_records(reader, split.ranges[0], max_len)
    V = reader_target.vocab_size
    counts = token_counts(records, V)  # (V,)
    ids = training_vocabulary(counts, size, eos_ids)  # (size,)
    seen = int(counts.sum())
    covered = int(counts[ids].sum())
    return ids, {
        "size": int(ids.numel()),
        "source": str(cache_url),
        "training_records": len(records),
        "answer_tokens": seen,
        "coverage": round(covered / max(1, seen), 4),
    }


def with_draft_vocab(drafter: Drafter, ids: torch.Tensor) -> Drafter:
    """A copy of `drafter` (same dtype) whose config and buffer hold the draft vocabulary `ids (n,)`."""
    config = dataclasses.replace(drafter.config, draft_vocab_size=int(ids.numel()))
    dtype = next(drafter.parameters()).dtype
    out = Drafter(config).to(dtype)
    state = {k: v for k, v in drafter.state_dict().items() if k != "draft_vocab"}
    missing = out.load_state_dict(state, strict=False).missing_keys
    if missing != ["draft_vocab"]:
        raise ValueError(f"unexpected drafter tensors missing: {missing}")
    out.set_draft_vocab(ids)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.draft_vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("--drafter", required=True, help="drafter checkpoint folder")
    p.add_argument("--cache", required=True, help="hidden-state cache (folder or s3://) it was trained on")
    p.add_argument("--size", type=int, required=True, help="draft vocabulary size n (0 < n <= V)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model spec (for its EOS ids)")
    p.add_argument("--heldout-records", type=int, default=48, help="eval.heldout_records of the training run")
    p.add_argument("--max-len", type=int, default=448, help="train.max_len of the training run")
    p.add_argument("--out", default=None, help="write here instead of rewriting --drafter in place")
    args = p.parse_args(argv)
    try:
        ckpt = load_drafter(args.drafter, dtype=stored_dtype(args.drafter))
        V = ckpt.config.vocab_size
        if not 0 < args.size <= V:
            raise ValueError(f"--size must be in (0, {V}], got {args.size}")
        target_config = TargetConfig.from_file(resolve_model(args.model) / "config.json")
        ids, source = cache_vocabulary(
            args.cache,
            args.size,
            target_config.eos_token_ids,
            args.heldout_records,
            args.max_len,
            ckpt.identity,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = dict(ckpt.card or {})
    card["draft_vocab"] = source
    out = Path(args.out or args.drafter)
    drafter = with_draft_vocab(ckpt.drafter, ids)
    save_drafter(out, drafter, drafter.config, ckpt.identity, card)
    print(
        f"{out}: draft vocabulary of {source['size']} ids covering {source['coverage']:.1%} of "
        f"{source['answer_tokens']} answer tokens in {source['training_records']} training records"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
