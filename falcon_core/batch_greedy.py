"""Batched plain greedy decoding of many prompts at once (throughput, for data generation).

`Engine` decodes one request at a time, which is what speculative decoding and serving at batch 1 need.
Making self-distillation data (the target's own answers to thousands of prompts) wants throughput
instead: `greedy_batch` decodes B prompts together through one KV cache of batch B. Prompts are right
padded to the longest, `Lmax`; row b's j-th new token is written at cache row `Lmax + j` with RoPE
position `len_b + j`, and its mask shows it the keys `[0, len_b)` and `[Lmax, Lmax + j]`, so padding
is never attended. Rows that finish (EOS or their own token limit) are dropped from the batch once
they are a quarter of it, so stragglers do not pay for the finished.

Greedy by the same weights, but not bit-identical to `Engine`'s batch-1 decoding: batched matmuls
round differently, so at a numerical near-tie (bf16 especially) a row may take the other token. For
data generation that is immaterial; for serving use `Engine`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from falcon_core.target import TargetModel


@torch.inference_mode()
def greedy_batch(
    target: TargetModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_ids: Sequence[int],
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (each non-empty), each at most its `max_new_tokens`.

    A continuation ends after its first token in `eos_ids` (the EOS is included) or at its limit.
    """
    B = len(prompts)
    if B == 0:
        return []
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != B or min(limits) < 0 or min(len(p) for p in prompts) == 0:
        raise ValueError("greedy_batch needs non-empty prompts and one max_new_tokens >= 0 per prompt")
    device = target.embed.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    Lmax = int(lens.max())
    steps = max(limits)
    out: list[list[int]] = [[] for _ in range(B)]
    if steps == 0:
        return out
    eos_ids = frozenset(eos_ids)
    ids = torch.full((B, Lmax), pad_id, dtype=torch.long, device=device)  # (B, Lmax)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    cache = target.new_cache(Lmax + steps, batch=B)
    cols = torch.arange(Lmax, device=device)  # (Lmax,)
    valid = cols[None, :] < lens[:, None]  # (B, Lmax)
    mask = (cols[None, :, None] >= cols[None, None, :]) & valid[:, None, :]  # (B, Lmax, Lmax)
    mask = mask | (cols[None, :, None] == cols[None, None, :])  # padded queries see themselves (no NaN)
    positions = cols[None, :].expand(B, Lmax)  # (B, Lmax)
    hidden = target(ids, positions, cache, 0, mask, logits_index=cols[:0]).hidden  # (B, Lmax, H)
    last = hidden[torch.arange(B, device=device), lens - 1]  # (B, H)
    token = target.lm_head(last).argmax(-1)  # (B,)

    rows = list(range(B))  # batch slot -> prompt index
    for j in range(steps):
        alive = []
        for slot, b in enumerate(rows):
            if len(out[b]) < limits[b] and (not out[b] or out[b][-1] not in eos_ids):
                out[b].append(int(token[slot]))
            done = len(out[b]) >= limits[b] or out[b][-1] in eos_ids
            alive.append(not done)
        if not any(alive):
            break
        if alive.count(False) * 4 >= len(rows):  # compact the batch
            keep = torch.tensor([s for s, a in enumerate(alive) if a], device=device)  # (B',)
            cache.k, cache.v = cache.k[:, keep].contiguous(), cache.v[:, keep].contiguous()
            rows = [rows[s] for s in keep.tolist()]
            token, lens = token[keep], lens[keep]
        S = Lmax + j + 1
        keys = torch.arange(S, device=device)  # (S,)
        step_mask = (keys[None, :] < lens[:, None]) | (keys[None, :] >= Lmax)  # (B', S)
        pos = (lens + j)[:, None]  # (B', 1)
        logits = target(token[:, None], pos, cache, Lmax + j, step_mask[:, None, :]).logits  # (B', 1, V)
        token = logits[:, -1].argmax(-1)  # (B',)
    return out
