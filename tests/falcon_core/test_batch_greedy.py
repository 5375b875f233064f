"""Batched greedy decoding (`falcon_core.batch_greedy`) against the batch-1 plain decoder, in fp32."""

from __future__ import annotations

import pytest
import torch

from falcon_core.batch_greedy import greedy_batch
from falcon_core.generate import Engine
from falcon_core.sampling import SamplingParams
from tests.falcon_core.test_generate import decode, tiny_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target(tmp_path_factory.mktemp("batch_greedy"), vocab=512, layers=2, seed=3)


def plain(target, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    """Batch-1 greedy by `Engine` (the reference), cut after the first EOS like `greedy_batch`."""
    out = decode(Engine(target, None), prompt, max_new, speculative=False)[0]
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def test_equals_batch_one_greedy_with_ragged_prompts_limits_and_eos(target):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 9, 1, 30, 12)]
    limits = [20, 5, 33, 14, 8, 0]
    reference = [plain(target, p, n, set()) for p, n in zip(prompts, limits, strict=True)]
    assert greedy_batch(target, prompts, limits, eos_ids=()) == reference
    # an EOS that some rows produce midway: those rows stop there, the others go on (and are compacted)
    counts: dict[int, int] = {}
    for r in reference:
        for t in r[1:]:
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)
    expected = [plain(target, p, n, {eos}) for p, n in zip(prompts, limits, strict=True)]
    assert any(len(e) < n for e, n in zip(expected, limits, strict=True))
    assert greedy_batch(target, prompts, limits, eos_ids=(eos,)) == expected


def test_bad_arguments_are_refused(target):
    assert greedy_batch(target, [], 4, ()) == []
    with pytest.raises(ValueError, match="non-empty prompts"):
        greedy_batch(target, [[1, 2], []], 4, ())
    with pytest.raises(ValueError, match="one max_new_tokens"):
        greedy_batch(target, [[1, 2]], [4, 5], ())
    assert SamplingParams().temperature == 0.0  # the reference decoder above is greedy by default
