"""Learning curves of trained drafters: what more training compute buys.

    falcon bench learning-curve --drafter models/smollm2-135m-falcon-k2 --drafter runs/k1 ... \\
        --out bench/results/learning-curve

Reads each drafter's model card (`card["training"]["history"]`, one entry per epoch, written by
`pipelines/train.py`: cumulative training tokens over all workers, held-out top-1 agreement per block
position, and tau decoded on held-out prompts at that epoch) and writes `learning_curve.json`, a
Markdown table and `learning_curve.png` (depth-1 agreement and tau against training tokens, one line
per drafter). Nothing is measured here: the figures are the ones the training run measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CurvePoint:
    epoch: int
    step: int
    tokens: int
    top1: tuple[float, ...]
    """Held-out top-1 agreement with the target per block position (1..K)."""
    tau: float | None
    """Tokens per target step (bonus included) decoding held-out prompts; None when not measured."""
    acceptance_per_depth: tuple[float, ...] | None


@dataclass(frozen=True)
class Curve:
    name: str
    objective: str
    block_size: int
    seconds: float | None
    points: tuple[CurvePoint, ...]


def read_curve(folder: Path) -> Curve:
    """The learning curve recorded in the model card of the drafter at `folder`."""
    config_path = folder / "config.json"
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable drafter config ({e})") from None
    card = meta.get("card") or {}
    history = (card.get("training") or {}).get("history")
    if not history:
        raise ValueError(
            f"{config_path}: the model card has no training history (trained before it was recorded?)"
        )
    points = tuple(
        CurvePoint(
            epoch=int(h["epoch"]),
            step=int(h["step"]),
            tokens=int(h["tokens"]),
            top1=tuple(float(x) for x in h.get("heldout_top1", [])),
            tau=None if h.get("tau") is None else float(h["tau"]),
            acceptance_per_depth=(
                None if h.get("acceptance_per_depth") is None else tuple(h["acceptance_per_depth"])
            ),
        )
        for h in history
    )
    return Curve(
        name=folder.name,
        objective=str(card["training"].get("objective", "?")),
        block_size=int(meta["drafter"]["block_size"]),
        seconds=card["training"].get("seconds"),
        points=points,
    )


def markdown(curves: Sequence[Curve]) -> str:
    lines = [
        "| drafter | k | objective | epoch | training tokens | held-out top-1 (per block position) | tau (chain-4) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        for p in c.points:
            top1 = ", ".join(f"{x:.3f}" for x in p.top1)
            tau = "-" if p.tau is None else f"{p.tau:.2f}"
            lines.append(
                f"| {c.name} | {c.block_size} | {c.objective} | {p.epoch} | {p.tokens:,} | {top1} | {tau} |"
            )
    return "\n".join(lines) + "\n"


def plot(curves: Sequence[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        label = f"{c.name} (k={c.block_size}, {c.objective})"
        tokens = [p.tokens for p in c.points]
        a.plot(tokens, [p.top1[0] if p.top1 else float("nan") for p in c.points], marker="o", label=label)
        b.plot(tokens, [float("nan") if p.tau is None else p.tau for p in c.points], marker="o", label=label)
    a.set(xlabel="training tokens", ylabel="held-out top-1, first block position", title="depth-1 agreement")
    b.set(xlabel="training tokens", ylabel="tokens per target step", title="tau (held-out prompts, chain-4)")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="falcon bench learning-curve", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--drafter", type=Path, action="append", required=True, help="a drafter folder (repeatable)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        curves = [read_curve(d) for d in args.drafter]
    except ValueError as e:
        print(f"falcon bench learning-curve: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    data: list[dict[str, Any]] = [
        {
            "name": c.name,
            "block_size": c.block_size,
            "objective": c.objective,
            "seconds": c.seconds,
            "points": [p.__dict__ for p in c.points],
        }
        for c in curves
    ]
    (args.out / "learning_curve.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "learning_curve.md").write_text(markdown(curves))
    plot(curves, args.out / "learning_curve.png")
    print(markdown(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
