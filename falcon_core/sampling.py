"""Logits processing (temperature, top-k, top-p) into probabilities, and seeded sampling.

The processed distribution is *the* target distribution: speculative sampling is lossless with respect
to it, so the target's verification rows and the plain decoder go through the same `logits_to_probs`.
Temperature 0 means greedy and yields a point mass on the argmax (first index on ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the target's logits."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides the logits before softmax."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p; 1 = off."""
    top_k: int = 0
    """Keep the top_k most likely tokens (ties at the boundary kept); 0 = off."""
    seed: int | None = None
    """Seed for the request's torch.Generator; None = nondeterministic."""

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded with `seed` (or from OS entropy when seed is None)."""
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities: temperature, then top-k, then top-p."""
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating tensor (..., V), got {tuple(logits.shape)} {logits.dtype}"
        )
    logits = logits.float()  # (..., V)
    if params.greedy:
        idx = logits.argmax(dim=-1, keepdim=True)  # (..., 1)
        return torch.zeros_like(logits).scatter_(-1, idx, 1.0)  # (..., V)
    logits = logits / params.temperature  # (..., V)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (..., V)
    probs = torch.softmax(logits, dim=-1)  # (..., V)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # (..., V), (..., V)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # (..., V)
        drop_sorted = mass_before >= params.top_p  # (..., V); the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # (..., V)
        probs = probs.masked_fill(drop, 0.0)  # (..., V)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # (..., V)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) probabilities -> (...) long samples, without a host sync.

    Exponential race (as gpt-fast's `multinomial_sample_one_no_sync`): argmax of p / E with E ~ Exp(1)
    is distributed as p. E is clamped away from 0 so a zero-probability token can never win.
    """
    race = torch.empty_like(probs, dtype=torch.float32).exponential_(1.0, generator=generator)  # (..., V)
    race = race.clamp_min_(torch.finfo(torch.float32).tiny)  # (..., V)
    return (probs.float() / race).argmax(dim=-1)  # (...)
