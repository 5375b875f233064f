"""Checking that an output equals plain greedy decoding, and accounting for near-ties in bf16 / fp16.

In fp32, speculative greedy output must equal plain greedy output token for token. In bf16 or fp16 a
verification forward over many tokens rounds differently from a one-token step, so the two can part at
a near-tie: a position where the plain decoder's two best logits are within rounding of each other. For
each divergence we report the plain decoder's top-2 logit gap at the first differing position.

Tolerance (`NEAR_TIE`): two units in the last place of a logit of magnitude 32 in the dtype: bf16 keeps
8 significant bits, so logits in [16, 32) are spaced 0.125 apart and a forward that sums differently can
move one by a unit or two: 0.25. fp16 (11 bits): 0.03125. fp32: 1e-4 (divergence there is a bug unless
the logits tie to within accumulated float32 error). SmolLM2's greedy logits measured here lie in 10-30.
A divergence whose gap exceeds the tolerance is reported as not a near-tie: a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from falcon_core.metrics import GenerationStats
from falcon_core.sampling import SamplingParams

NEAR_TIE: dict[torch.dtype, float] = {torch.bfloat16: 0.25, torch.float16: 0.03125, torch.float32: 1e-4}


@dataclass(frozen=True)
class LosslessCheck:
    """One output compared with plain greedy decoding of the same prompt."""

    compared: int
    """Tokens compared (the shorter of the two outputs)."""
    exact: bool
    first_divergence: int | None = None
    """Index of the first differing token, None when equal."""
    plain_token: int | None = None
    other_token: int | None = None
    top2_gap: float | None = None
    """Plain decoder's logit(top1) - logit(top2) at the first divergence."""
    other_gap: float | None = None
    """Plain decoder's logit(top1) - logit(other_token) there."""
    tolerance: float | None = None
    near_tie: bool | None = None

    @property
    def ok(self) -> bool:
        return self.exact or bool(self.near_tie)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def plain_logits_at(engine: Any, prompt_ids: Sequence[int], step: int) -> torch.Tensor:
    """(V,) logits that the engine's plain greedy decoder chooses its token `step` from."""
    seen: list[torch.Tensor] = []
    steps = engine._decode(
        list(prompt_ids), step + 1, SamplingParams(), False, GenerationStats(), on_plain_logits=seen.append
    )
    for _ in steps:
        if len(seen) > step:
            break
    steps.close()
    return seen[step].float()


def check_against_plain(
    engine: Any, prompt_ids: Sequence[int], plain_ids: Sequence[int], other_ids: Sequence[int]
) -> LosslessCheck:
    """Compare `other_ids` with `plain_ids` (plain greedy from `engine` on `prompt_ids`)."""
    n = min(len(plain_ids), len(other_ids))
    j = next((i for i in range(n) if plain_ids[i] != other_ids[i]), None)
    if j is None:
        if len(plain_ids) == len(other_ids):
            return LosslessCheck(compared=n, exact=True)
        return LosslessCheck(compared=n, exact=False, first_divergence=n, near_tie=False)  # one stopped early
    logits = plain_logits_at(engine, prompt_ids, j)  # (V,)
    top = logits.topk(2).values
    dtype = engine.target.embed.weight.dtype
    tol = NEAR_TIE.get(dtype, 1e-4)
    top2 = float(top[0] - top[1])
    other = float(top[0] - logits[other_ids[j]])
    return LosslessCheck(
        compared=n,
        exact=False,
        first_divergence=j,
        plain_token=int(plain_ids[j]),
        other_token=int(other_ids[j]),
        top2_gap=top2,
        other_gap=other,
        tolerance=tol,
        near_tie=other <= tol,
    )
