"""Preallocated key/value cache written by row index (gpt-fast style), with commit compaction.

Rows `[0, length)` hold committed tokens. A forward over `T` new positions at `cache_pos` writes rows
`[cache_pos, cache_pos + T)` and never changes `length`; the caller decides what to keep with
`commit(rows, dst)`, which copies the chosen rows (e.g. the accepted path of a verified tree) to
`[dst, dst + n)` and sets `length = dst + n`. Rows past `length` are scratch.
"""

from __future__ import annotations

import torch


class KVCache:
    """K/V buffers `(L, B, nkv, max_rows, hd)` shared by all layers of one model."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_rows: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(num_layers, batch, num_kv_heads, max_rows, head_dim) <= 0:
            raise ValueError(
                "KVCache dimensions must be positive, got "
                f"L={num_layers} B={batch} nkv={num_kv_heads} rows={max_rows} hd={head_dim}"
            )
        shape = (num_layers, batch, num_kv_heads, max_rows, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nkv, max_rows, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nkv, max_rows, hd)
        self.length = 0

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_rows(self) -> int:
        return self.k.shape[3]

    def commit(self, rows: torch.Tensor, dst: int) -> None:
        """Copy rows `rows (n,)` to `[dst, dst + n)` in every layer; set `length = dst + n`.

        Sources may overlap the destination (the gather copies first). No host sync: `n` is a shape.
        """
        if rows.dim() != 1 or rows.dtype != torch.long:
            raise ValueError(f"rows must be a 1-D long tensor, got {tuple(rows.shape)} {rows.dtype}")
        n = rows.shape[0]
        if dst < 0 or dst + n > self.max_rows:
            raise ValueError(f"commit to rows [{dst}, {dst + n}) does not fit {self.max_rows} rows")
        rows = rows.to(self.k.device)
        self.k[:, :, :, dst : dst + n] = self.k.index_select(3, rows)  # (L, B, nkv, n, hd)
        self.v[:, :, :, dst : dst + n] = self.v.index_select(3, rows)  # (L, B, nkv, n, hd)
        self.length = dst + n

    def reset(self) -> None:
        """Forget every row (buffers are kept, not cleared: rows past `length` are never read)."""
        self.length = 0
