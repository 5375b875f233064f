"""Speculative-decoding metrics, per request and aggregated (names and definitions: FALCON.md "Metrics").

- tau (mean accepted length) = tokens produced by decode steps / target decode forwards. Each
  verification forward yields its accepted draft tokens plus one bonus token, so tau includes the bonus
  (vLLM's `1 + accepted / drafts`); `tau_no_bonus` = tau - 1 is the paper's Table 3 convention. The
  first token, which comes from the prefill forward, is not counted in either. Plain decoding has tau 1.
- Acceptance per depth (vLLM's per-position counters): `drafts_per_depth[d]` counts the speculative
  steps whose tree reaches depth d+1; `accepted_per_depth[d]` counts those where the accepted path
  reached depth d+1. Their ratio is the acceptance rate at that depth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    """Counters and timings of one generation request."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_tokens: int = 0
    """Tokens produced by decode forwards (new_tokens minus the prefill's first token, before truncation)."""
    target_forwards: int = 0
    """Decode forwards of the target (verification or plain steps), prefill excluded."""
    speculative_steps: int = 0
    drafter_passes: int = 0
    drafts_per_depth: list[int] = field(default_factory=list)
    accepted_per_depth: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    drafter_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0

    def record_step(
        self, tree_depth: int, accepted: int, passes: int, draft_s: float, verify_s: float
    ) -> None:
        """One speculative step over a tree of `tree_depth` whose accepted path has `accepted` draft tokens."""
        self.speculative_steps += 1
        self.target_forwards += 1
        self.decode_tokens += accepted + 1
        self.drafter_passes += passes
        self.drafter_seconds += draft_s
        self.verify_seconds += verify_s
        grow = tree_depth - len(self.drafts_per_depth)
        if grow > 0:
            self.drafts_per_depth += [0] * grow
            self.accepted_per_depth += [0] * grow
        for d in range(tree_depth):
            self.drafts_per_depth[d] += 1
        for d in range(accepted):
            self.accepted_per_depth[d] += 1

    def record_plain_step(self, seconds: float) -> None:
        self.target_forwards += 1
        self.decode_tokens += 1
        self.verify_seconds += seconds

    @property
    def tau(self) -> float:
        return self.decode_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        return [
            a / d if d else 0.0 for a, d in zip(self.accepted_per_depth, self.drafts_per_depth, strict=True)
        ]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            tau=self.tau,
            tau_no_bonus=max(self.tau - 1.0, 0.0),
            acceptance_per_depth=self.acceptance_per_depth,
            tokens_per_second=self.tokens_per_second,
            drafter_passes_per_step=self.drafter_passes / self.speculative_steps
            if self.speculative_steps
            else 0.0,
        )
        return d


def aggregate(stats: Iterable[GenerationStats]) -> GenerationStats:
    """Sum of the counters and timings of many requests (ratios then follow from the sums)."""
    total = GenerationStats()
    for s in stats:
        for name in (
            "prompt_tokens",
            "new_tokens",
            "decode_tokens",
            "target_forwards",
            "speculative_steps",
            "drafter_passes",
            "prefill_seconds",
            "drafter_seconds",
            "verify_seconds",
            "total_seconds",
        ):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        grow = len(s.drafts_per_depth) - len(total.drafts_per_depth)
        if grow > 0:
            total.drafts_per_depth += [0] * grow
            total.accepted_per_depth += [0] * grow
        for d, (n, a) in enumerate(zip(s.drafts_per_depth, s.accepted_per_depth, strict=True)):
            total.drafts_per_depth[d] += n
            total.accepted_per_depth[d] += a
    return total
