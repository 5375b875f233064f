"""Validation of a drafter: agreement with the target on held-out cached data, and tau by decoding.

Terms (FALCON.md "Metrics"; alignment as in `pipelines.csgd`):
- *Held-out top-1 per block position*: one clean pass over held-out records with left-aligned blocks;
  at block position j (depth j+1 of a drafting step) the fraction of valid positions whose drafter
  argmax (full LM head) equals the target's greedy token (`argmax lm_head(f_{i+K})`, or the cached top-1).
- *Acceptance per depth and rank* (`acceptance[d][r]`, the model card's table for `--tree auto`): the
  probability that the target's greedy token at depth d+1 is the drafter's rank-r candidate, given that
  every shallower depth's greedy token was among the drafter's first R candidates (so the path exists in
  a tree R wide). Depths 1..K come from the pass above (each block is a drafting step whose bonus token
  follows the block). Depths K+1..2K come from a simulated second pass: each block is followed by a copy
  block at the next K positions that reads the first pass's predicted features and the true tokens (the
  accepted path), seeing the clean context up to its anchor block and itself, as a tree pass does.
- *tau*: generated tokens per target verification forward (bonus included) from greedy decoding of
  held-out prompts with `falcon_core.generate.Engine`; plus acceptance per depth of the decoding tree.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from falcon_core.drafter import Drafter
from falcon_core.metrics import aggregate
from pipelines.csgd import Batch, align, block_layout
from pipelines.hidden_cache import CachedRecord

LOGIT_CHUNK = 1024
"""Rows of full-vocabulary logits computed at once (bounds memory: 1024 x V floats)."""


# ---------------------------------------------------------------------------------------------------
# Held-out cached data


@dataclass
class HeldoutResult:
    correct: torch.Tensor
    """(K,) long: valid positions per block position whose drafter argmax is the target's token."""
    total: torch.Tensor
    """(K,) long"""
    acceptance: list[list[float]]
    """[depth][rank] for depths 1..2K (empty when not asked for)."""
    acceptance_counts: list[int]
    """Conditioning events per depth (how many drafting steps each row of `acceptance` rests on)."""

    @property
    def top1(self) -> list[float]:
        return [c / max(1, t) for c, t in zip(self.correct.tolist(), self.total.tolist(), strict=True)]


def _topk_rows(x: torch.Tensor, lm_head: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., H) -> ids (..., k) of the k largest logits of the full head, in chunks of rows."""
    flat = x.reshape(-1, x.shape[-1])  # (R, H)
    out = torch.empty(flat.shape[0], k, dtype=torch.long, device=x.device)  # (R, k)
    for s in range(0, flat.shape[0], LOGIT_CHUNK):
        out[s : s + LOGIT_CHUNK] = (
            F.linear(flat[s : s + LOGIT_CHUNK].float(), lm_head.float()).topk(k, -1).indices
        )
    return out.view(*x.shape[:-1], k)


def target_tokens(batch: Batch, lm_head: torch.Tensor, K: int, Tp: int) -> torch.Tensor:
    """(B, T') long: the target's greedy token predicted from f_{i+K} (the cached top-1 when present)."""
    if batch.topk_ids is not None:
        return batch.topk_ids[:, K : K + Tp, 0].long()
    return _topk_rows(batch.hidden[:, K : K + Tp], lm_head, 1)[..., 0]


@torch.no_grad()
def heldout_agreement(
    drafter: Drafter,
    embed: torch.Tensor,
    lm_head: torch.Tensor,
    records: Sequence[CachedRecord],
    K: int,
    batch_size: int = 8,
    max_len: int | None = None,
    ranks: int = 0,
) -> HeldoutResult:
    """Top-1 per block position over `records`; with `ranks` > 0 also the acceptance table (module doc)."""
    device = embed.device
    correct = torch.zeros(K, dtype=torch.long)
    total = torch.zeros(K, dtype=torch.long)
    hits_sum = torch.zeros(2 * K, max(ranks, 1), dtype=torch.long)
    cond_sum = torch.zeros(2 * K, dtype=torch.long)
    for s in range(0, len(records), batch_size):
        batch = Batch.collate(records[s : s + batch_size], max_len).to(device)
        a = align(batch, K)
        B, Tp = a.valid.shape
        mask, block_pos = block_layout(B, Tp, K, None)  # (B, T', T'), (B, T')
        mask, block_pos = mask.to(device), block_pos.to(device)
        pred = drafter(F.embedding(a.next_tokens, embed), a.features, a.positions, mask=mask)  # (B, T', H)
        tgt = target_tokens(batch, lm_head, K, Tp)  # (B, T')
        top = _topk_rows(pred, lm_head, max(ranks, 1))  # (B, T', R)
        right = (top[..., 0] == tgt) & a.valid  # (B, T')
        correct += torch.bincount(block_pos[right].cpu(), minlength=K)
        total += torch.bincount(block_pos[a.valid].cpu(), minlength=K)
        if ranks > 0:
            h, c = _acceptance_counts(drafter, embed, lm_head, a, pred, top, tgt, K, ranks)
            hits_sum += h
            cond_sum += c
    acceptance = []
    if ranks > 0:
        acceptance = [
            [round(float(h) / max(1, int(c)), 4) for h in row]
            for row, c in zip(hits_sum, cond_sum, strict=True)
        ]
    return HeldoutResult(correct, total, acceptance, cond_sum.tolist() if ranks > 0 else [])


def second_pass(drafter: Drafter, embed: torch.Tensor, a: Any, pred: torch.Tensor, K: int) -> torch.Tensor:
    """The simulated second drafting pass, (B, T', H): copy q (q >= K, left-aligned blocks) reads
    `(pred_{q-K}, t_{q+1})` at position q and sees the clean blocks before its own plus its copy block.
    One forward over 2T' positions: the T' clean ones, then the T' copies. Rows q < K are unused."""
    Tp = a.valid.shape[1]
    feats2 = torch.cat((a.features[:, :K], pred[:, : Tp - K]), dim=1)  # (B, T', H)
    block = torch.arange(Tp, device=pred.device) // K  # (T',)
    tl = block[None, :] <= block[:, None]  # (T', T') block-causal
    bl = block[None, :] < block[:, None]  # (T', T') strictly earlier blocks
    br = block[None, :] == block[:, None]  # (T', T') own block
    mask = torch.cat((torch.cat((tl, torch.zeros_like(tl)), 1), torch.cat((bl, br), 1)), 0)  # (2T', 2T')
    emb = F.embedding(a.next_tokens, embed)  # (B, T', H)
    out = drafter(torch.cat((emb, emb), 1), torch.cat((a.features, feats2), 1),
                  torch.cat((a.positions, a.positions), 1), mask=mask)  # fmt: skip
    return out[:, Tp:]  # (B, T', H)


def _acceptance_counts(
    drafter: Drafter,
    embed: torch.Tensor,
    lm_head: torch.Tensor,
    a: Any,
    pred: torch.Tensor,
    top1: torch.Tensor,
    tgt: torch.Tensor,
    K: int,
    R: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits (2K, R), conditioning counts (2K,)) of the blocks of one batch (left-aligned blocks)."""
    B, Tp = a.valid.shape
    out2 = second_pass(drafter, embed, a, pred, K)  # (B, T', H)
    top2 = _topk_rows(out2, lm_head, R)  # (B, T', R)
    nb = Tp // K - 1  # blocks with a full second block after them
    if nb <= 0:
        return torch.zeros(2 * K, R, dtype=torch.long), torch.zeros(2 * K, dtype=torch.long)
    span = slice(0, nb * K)
    hit1 = (top1[:, span] == tgt[:, span, None]).view(B, nb, K, R)  # (B, nb, K, R) depths 1..K
    hit2 = (top2[:, K : K + nb * K] == tgt[:, K : K + nb * K, None]).view(B, nb, K, R)  # depths K+1..2K
    valid = torch.cat((a.valid[:, span].view(B, nb, K), a.valid[:, K : K + nb * K].view(B, nb, K)), -1)
    hits = torch.cat((hit1, hit2), 2)  # (B, nb, 2K, R)
    inside = hits.any(-1)  # (B, nb, 2K) the greedy token is among the R candidates
    reach = torch.cumprod(
        torch.cat((torch.ones_like(inside[..., :1]), inside[..., :-1]), -1).long(), -1
    ).bool()
    cond = reach & valid  # (B, nb, 2K): every shallower depth inside, this depth's target valid
    hits_sum = (hits & cond[..., None]).sum((0, 1)).cpu()  # (2K, R)
    return hits_sum, cond.sum((0, 1)).cpu()


# ---------------------------------------------------------------------------------------------------
# tau by decoding


@dataclass(frozen=True)
class TauResult:
    tau: float
    """Generated tokens per target decode forward (bonus included)."""
    tau_no_bonus: float
    acceptance_per_depth: list[float]
    prompts: int
    new_tokens: int
    target_forwards: int
    seconds: float


def load_prompts(spec: str, n: int) -> list[dict[str, Any]]:
    """The first n held-out prompts as `Engine.generate` keyword arguments ({"messages"} or {"prompt"})."""
    from falcon_core.data import mtbench_path, read_prompts

    items = read_prompts(mtbench_path() if spec == "mtbench" else Path(spec))[:n]
    return [
        {"messages": [dict(m) for m in it.messages]} if it.messages else {"prompt": it.prompt} for it in items
    ]


class TauEvaluator:
    """A loaded target and tokenizer plus held-out prompts; `measure(drafter)` decodes them greedily."""

    def __init__(
        self, target: Any, tokenizer: Any, prompts: list[dict[str, Any]], max_new_tokens: int, tree: str
    ):
        self.target, self.tokenizer, self.prompts = target, tokenizer, prompts
        self.max_new_tokens, self.tree = max_new_tokens, tree

    @classmethod
    def load(
        cls, target_folder: str, cfg: Any, device: torch.device | str = "cpu", dtype: str | None = None
    ) -> TauEvaluator:
        """From a `DistillConfig`'s eval section (dtype: `eval.dtype` unless given)."""
        from transformers import AutoTokenizer

        from falcon_core.target import load_target

        e = cfg.eval
        target = load_target(target_folder, dtype=dtype or e.dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(target_folder)
        return cls(target, tokenizer, load_prompts(e.prompts, e.tau_prompts), e.tau_max_new_tokens, e.tree)

    def engine(self, drafter: Drafter | None, card: dict[str, Any] | None = None) -> Any:
        """An engine over the loaded target; tree `self.tree` ("auto": fitted to `card["acceptance"]`)."""
        from falcon_core.generate import Engine, select_tree

        if drafter is None:
            return Engine(self.target, self.tokenizer, None)
        dtype = self.target.embed.weight.dtype
        drafter = copy.deepcopy(drafter).to(device=self.target.embed.weight.device, dtype=dtype).eval()
        return Engine(self.target, self.tokenizer, drafter, tree=select_tree(self.tree, card))

    def measure(self, drafter: Drafter, card: dict[str, Any] | None = None) -> TauResult:
        engine = self.engine(drafter, card)
        start = time.perf_counter()
        stats = [engine.generate(**p, max_new_tokens=self.max_new_tokens).stats for p in self.prompts]
        total = aggregate(stats)
        return TauResult(
            tau=total.tau,
            tau_no_bonus=max(total.tau - 1.0, 0.0),
            acceptance_per_depth=[round(x, 4) for x in total.acceptance_per_depth],
            prompts=len(self.prompts),
            new_tokens=total.new_tokens,
            target_forwards=total.target_forwards,
            seconds=time.perf_counter() - start,
        )

    def lossless(self, drafter: Drafter) -> list[bool]:
        """Per prompt: greedy output with the drafter == without it (exact only in fp32)."""
        spec, plain = self.engine(drafter), self.engine(None)
        same = []
        for p in self.prompts:
            a = spec.generate(**p, max_new_tokens=self.max_new_tokens).token_ids
            b = plain.generate(**p, max_new_tokens=self.max_new_tokens).token_ids
            same.append(a == b)
        return same
