"""Causal, block-causal and prefixed masks (True = may attend)."""

import pytest
import torch

from falcon_core.masks import block_causal_mask, block_ids, causal_mask, with_prefix


def test_causal_mask_with_cache():
    m = causal_mask(3, cache_pos=2)
    assert m.dtype == torch.bool and m.shape == (3, 5)
    assert m.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_block_causal_right_aligned_last_block_ends_at_newest():
    m = block_causal_mask(5, 2)  # blocks {0} {1,2} {3,4}
    assert m.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ]
    assert block_ids(7, 3).tolist() == [0, 1, 1, 1, 2, 2, 2]


def test_block_causal_left_aligned_and_offsets():
    assert block_ids(5, 2, right_aligned=False).tolist() == [0, 0, 1, 1, 2]
    assert block_ids(6, 3, offset=1).tolist() == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="offset must be in"):
        block_ids(4, 2, offset=2)


@pytest.mark.parametrize("T,K", [(1, 1), (6, 1), (7, 2), (9, 3), (4, 4)])
def test_block_causal_semantics(T, K):
    """Each position sees every earlier block and all of its own block, nothing later."""
    m = block_causal_mask(T, K)
    ids = block_ids(T, K)
    assert ids[-1] == (T - 1 + (-T) % K) // K and (ids == ids[-1]).sum() == min(K, T)
    for i in range(T):
        for j in range(T):
            assert m[i, j] == (ids[j] <= ids[i])
    if K == 1:
        assert torch.equal(m, causal_mask(T))


def test_with_prefix():
    m = with_prefix(block_causal_mask(3, 2), 2)
    assert m.shape == (3, 5)
    assert m[:, :2].all() and torch.equal(m[:, 2:], block_causal_mask(3, 2))
    with pytest.raises(ValueError, match="2-D bool"):
        with_prefix(torch.ones(2, 2), 1)
