"""Attention masks as bool tensors, True = may attend (the convention of F.scaled_dot_product_attention).

- causal: row i of the T new positions sees every cached row and new positions `<= i`.
- block-causal (Falcon's relaxed causal mask): positions are grouped in blocks of K; a position sees
  every earlier block and every position of its own block (bidirectional inside a block). Blocks are
  right-aligned by default, so the last block ends at the newest position; `offset` sets the alignment
  explicitly (training with random block offsets). Tree masks belong to `tree.py`.
"""

from __future__ import annotations

import torch


def causal_mask(T: int, cache_pos: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, cache_pos + T): new position i sees rows `[0, cache_pos + i]`."""
    rows = torch.arange(T, device=device)[:, None] + cache_pos  # (T, 1)
    cols = torch.arange(cache_pos + T, device=device)[None, :]  # (1, S)
    return cols <= rows  # (T, S)


def block_ids(T: int, K: int, right_aligned: bool = True, offset: int | None = None) -> torch.Tensor:
    """Block index of each of T positions, (T,) long: `(i + offset) // K`.

    `offset` in [0, K) is how many positions the first block lacks; default: `(-T) % K` when right-aligned
    (the last block ends at position T-1), 0 when left-aligned (blocks start at position 0).
    """
    if K < 1:
        raise ValueError(f"block size K must be >= 1, got {K}")
    if offset is None:
        offset = (-T) % K if right_aligned else 0
    if not 0 <= offset < K:
        raise ValueError(f"offset must be in [0, {K}), got {offset}")
    return (torch.arange(T) + offset) // K  # (T,)


def block_causal_mask(
    T: int,
    K: int,
    right_aligned: bool = True,
    offset: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(T, T): position i sees j iff block(j) <= block(i). K = 1 is the plain causal mask."""
    ids = block_ids(T, K, right_aligned, offset).to(device)  # (T,)
    return ids[None, :] <= ids[:, None]  # (T, T)


def with_prefix(mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(T, T') -> (T, prefix_len + T'): every new position also sees all `prefix_len` cached rows."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    prefix = torch.ones(mask.shape[0], prefix_len, dtype=torch.bool, device=mask.device)  # (T, prefix_len)
    return torch.cat((prefix, mask), dim=1)  # (T, prefix_len + T')
