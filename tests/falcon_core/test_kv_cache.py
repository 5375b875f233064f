"""KVCache allocation and commit compaction."""

import pytest
import torch

from falcon_core.kv_cache import KVCache


def test_shapes_and_reset():
    c = KVCache(3, 2, 4, 10, 8, dtype=torch.bfloat16)
    assert c.k.shape == c.v.shape == (3, 2, 4, 10, 8) and c.k.dtype == torch.bfloat16
    assert (c.num_layers, c.batch, c.max_rows, c.length) == (3, 2, 10, 0)
    c.length = 4
    c.reset()
    assert c.length == 0


def test_commit_copies_rows_in_every_layer_even_when_overlapping():
    c = KVCache(2, 1, 1, 12, 1)
    c.k[..., 0] = torch.arange(12.0)  # row r holds value r
    c.v[..., 0] = -torch.arange(12.0)
    c.commit(torch.tensor([4, 6, 7]), dst=5)  # sources overlap the destination [5, 8)
    assert c.k[0, 0, 0, :, 0].tolist()[:8] == [0, 1, 2, 3, 4, 4, 6, 7]
    assert c.k[1, 0, 0, 5:8, 0].tolist() == [4, 6, 7]
    assert c.v[1, 0, 0, 5:8, 0].tolist() == [-4, -6, -7]
    assert c.length == 8


def test_commit_errors():
    c = KVCache(1, 1, 1, 4, 1)
    with pytest.raises(ValueError, match="does not fit 4 rows"):
        c.commit(torch.tensor([0, 1]), dst=3)
    with pytest.raises(ValueError, match="1-D long"):
        c.commit(torch.tensor([0.0]), dst=0)
    with pytest.raises(ValueError, match="must be positive"):
        KVCache(1, 1, 1, 0, 1)
