"""Sampling parameters, logits processing and seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch

from falcon_core.sampling import SamplingParams, logits_to_probs, sample


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature .* -0.1"),
        ({"temperature": float("nan")}, "temperature .* nan"),
        ({"temperature": float("inf")}, "temperature .* inf"),
        ({"temperature": "1"}, "temperature .* '1'"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, "top_p .* 1.5"),
        ({"top_p": float("nan")}, "top_p .* nan"),
        ({"top_k": -1}, "top_k .* -1"),
        ({"top_k": 2.0}, "top_k .* 2.0"),
        ({"top_k": True}, "top_k .* True"),
        ({"seed": "7"}, "seed .* '7'"),
    ],
)
def test_params_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_params_greedy_and_generator() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    a = torch.rand(4, generator=SamplingParams(seed=3).generator())
    b = torch.rand(4, generator=SamplingParams(seed=3).generator())
    assert torch.equal(a, b)


def test_greedy_is_point_mass_on_first_argmax() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, -1.0, 0.0, 2.0]], dtype=torch.bfloat16)
    probs = logits_to_probs(logits, SamplingParams())
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_temperature_softmax() -> None:
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    probs = logits_to_probs(logits, SamplingParams(temperature=0.5))
    assert probs.shape == (2, 3, 11)
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, dim=-1))


def test_top_k_then_top_p() -> None:
    logits = torch.log(torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1]))
    top_k = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    torch.testing.assert_close(top_k, torch.tensor([0, 0.4, 0.25, 0.2, 0]) / 0.85)
    # top-p: smallest set of most likely tokens whose mass reaches p
    top_p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.6))
    torch.testing.assert_close(top_p, torch.tensor([0, 0.4, 0.25, 0, 0]) / 0.65)
    tiny_p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert tiny_p.tolist() == [0, 1, 0, 0, 0]
    # top-k first (0.4, 0.25 renormalised to 0.615, 0.385), then top-p 0.5 keeps the first alone
    both = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert both.tolist() == [0, 1, 0, 0, 0]
    # top_k >= V is off
    torch.testing.assert_close(
        logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=9)), torch.softmax(logits, -1)
    )


def test_logits_to_probs_rejects_int_logits() -> None:
    with pytest.raises(ValueError, match="floating"):
        logits_to_probs(torch.tensor([1, 2]), SamplingParams(temperature=1.0))


def test_sample_matches_distribution_and_seed() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 40_000
    draws = sample(probs.expand(n, 5), torch.Generator().manual_seed(1))
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=5).double() / n
    sigma = torch.sqrt(probs.double() * (1 - probs.double()) / n)
    assert freq[1] == 0.0  # a zero-probability token never wins
    assert torch.all((freq - probs.double()).abs() <= 5 * sigma + 1e-12), freq
    again = sample(probs.expand(n, 5), torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)
    # batch shape kept
    assert sample(torch.full((2, 3, 4), 0.25), torch.Generator().manual_seed(0)).shape == (2, 3)


def test_sample_point_mass() -> None:
    probs = torch.zeros(7)
    probs[4] = 1.0
    assert {int(sample(probs, torch.Generator().manual_seed(s))) for s in range(50)} == {4}
    assert math.isclose(float(logits_to_probs(torch.zeros(3), SamplingParams(temperature=2.0)).sum()), 1.0)
