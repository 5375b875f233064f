"""Rendering benchmark results (the dict `bench.runner.Runner.run` returns): JSON, a Markdown table and
PNG plots (speed-up per method and benchmark, acceptance per depth, tokens/s against tree size).

Plots use matplotlib's Agg backend (no display). A plot with nothing to show (no speculative method
ran) is still written, with a note saying so, so a results folder always has the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"
PLOTS = ("speedup.png", "acceptance.png", "tokens_per_tree.png")
TABLE_DEPTHS = 4


def write_report(results: dict[str, Any], out: Path, tree_fit: dict[str, Any] | None = None) -> list[Path]:
    """Write bench.json, bench.md and the plots into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_FILE, out / MARKDOWN_FILE, *(out / p for p in PLOTS)]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    plot_speedup(results, paths[2])
    plot_acceptance(results, paths[3])
    plot_tokens_per_tree(results, paths[4], tree_fit)
    return paths


def _fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    cfg = results["config"]
    lines = [
        "# falcon bench",
        "",
        f"{env['model']} in {env['dtype']} on {env['device']} ({env['processor']}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads); batch 1, greedy, {cfg['max_new_tokens']} new tokens at most; "
        f"load average {env['load_average_start'][0]:.2f} at start, {env['load_average_end'][0]:.2f} at end"
        + (f" (**{env['note']}; timings not meaningful**)" if not env["timings_meaningful"] else "")
        + ".",
        "",
    ]
    depth_cols = [f"acc d{d}" for d in range(1, TABLE_DEPTHS + 1)]
    head = ["method", "tokens/s", "speed-up", "tau", *depth_cols, "tree nodes", "equal to greedy"]
    for bench, b in results["benchmarks"].items():
        base = b["baseline"]
        lines += [
            f"## {bench} ({len(b['prompts'])} prompts)",
            "",
            f"Speed-up over the fastest plain greedy decoder: {base['method']} "
            f"({base['tokens_per_second']:.1f} tokens/s)."
            if base
            else "No plain greedy decoder ran: no speed-up.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for name, s in b["summary"].items():
            acc = s.get("acceptance_per_depth") or []
            accs = [_fmt(acc[d]) if d < len(acc) else "-" for d in range(TABLE_DEPTHS)]
            eq = s.get("equal")
            eq_s = "-" if eq is None else f"{eq['exact']}/{eq['checked']} exact, {eq['near_tie']} near-tie"
            if eq and eq["not_ok"]:
                eq_s += f", **{eq['not_ok']} not a near-tie**"
            row = [name, _fmt(s["tokens_per_second"], 1), _fmt(s["speedup"], 2, "x"), _fmt(s.get("tau"))]
            lines.append("| " + " | ".join([*row, *accs, str(s["tree_nodes"]), eq_s]) + " |")
        lines.append("")
    notes = [f"- {n}: {m['reason']}" for n, m in results["methods"].items() if m["status"] == "skipped"]
    if notes:
        lines += ["Skipped:", "", *notes, ""]
    details = [
        f"- {n}: " + ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("status", "cache_choice"))
        for n, m in results["methods"].items()
        if m["status"] == "ok"
    ]
    lines += ["Methods:", "", *details, ""]
    lines += [
        "tau: tokens per target forward, bonus included (plain decoding: 1). acc dN: share of speculative "
        "steps whose accepted path reached depth N. Equal to greedy: output identical to our plain greedy "
        "decoder, or parting from it only at a near-tie (falcon_core/lossless.py).",
        "",
    ]
    return "\n".join(lines)


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_speedup(results: dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    benches = list(results["benchmarks"])
    names = [n for n, m in results["methods"].items() if m["status"] == "ok"]
    width = 0.8 / max(len(names), 1)
    drawn = False
    for i, name in enumerate(names):
        vals = [(results["benchmarks"][b]["summary"].get(name) or {}).get("speedup") for b in benches]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(benches))]
        ys = [v or 0.0 for v in vals]
        if any(v is not None for v in vals):
            drawn = True
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("speed-up over fastest plain greedy")
    ax.set_title("Speed-up per method and benchmark")
    if drawn:
        ax.legend(fontsize=8)
    else:
        _note(ax, "no plain greedy decoder ran: no speed-up")
    _save(fig, path)


def plot_acceptance(results: dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    drawn = False
    for bench, b in results["benchmarks"].items():
        for name, s in b["summary"].items():
            acc = s.get("acceptance_per_depth")
            if acc and not s["plain"]:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{name} ({bench})")
                drawn = True
    ax.set_xlabel("depth")
    ax.set_ylabel("acceptance (accepted path reaches depth)")
    ax.set_ylim(0, 1)
    ax.set_title("Acceptance per depth")
    if drawn:
        ax.legend(fontsize=8)
    else:
        _note(ax, "no speculative method of ours ran")
    _save(fig, path)


def plot_tokens_per_tree(results: dict[str, Any], path: Path, tree_fit: dict[str, Any] | None) -> None:
    fig, ax = _figure()
    for bench, b in results["benchmarks"].items():
        pts = [(s["tree_nodes"], s["tokens_per_second"], n) for n, s in b["summary"].items() if s["tokens"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"measured ({bench})")
            for x, y, n in pts:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if tree_fit:
        rows = tree_fit["budgets"]
        ax.plot(
            [r["nodes"] for r in rows],
            [r["tokens_per_second"] for r in rows],
            color="grey",
            lw=1,
            label=f"tree-fit model (k = {tree_fit.get('k')})",
        )
        best = tree_fit["best"]
        ax.scatter(
            [best["nodes"]],
            [best["tokens_per_second"]],
            marker="*",
            s=120,
            color="black",
            label=f"fitted tree ({best['nodes']} nodes)",
        )
    ax.set_xlabel("tree nodes verified per step (0: plain / prompt lookup)")
    ax.set_ylabel("tokens / s")
    ax.set_title("Tokens/s against tree size")
    ax.legend(fontsize=8)
    _save(fig, path)
