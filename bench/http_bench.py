"""HTTP benchmark of the Serve endpoint: latency and tokens/s with speculation on vs off, at 1 and 4
concurrent clients, in one run.

    python -m bench.http_bench [--config deploy/serve_config.yaml] [--drafter PATH] [--prompts 8]
                               [--max-tokens 64] [--concurrency 1 4] [--replicas 1] [--url URL]

Without `--url` it starts the application from the Serve config on a local Ray (127.0.0.1), with the
first model's replica count pinned to `--replicas` (default 1, so concurrency measures one replica).
Each condition sends the same MT-Bench first turns as streamed chat completions (greedy) through the
official `openai` client and measures, per request, time to first token and latency; per condition,
aggregate tokens/s (all completion tokens / wall time). The server's `/metrics` deltas add the engine's
queue time and, with a drafter, tau and acceptance per position.

Batching: an engine serves one request at a time, so at concurrency 4 requests wait in the replica's
queue and, once running, decode as fast as a lone request; the report states the measured queue time and
per-request decode-rate ratio (`batching_verdict`). Results go to `bench/results/http_bench-<time>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float
    completion_tokens: int
    error: str = ""


@dataclass(frozen=True)
class ConditionResult:
    """One (speculative, concurrency) cell of the benchmark."""

    speculative: bool
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    """All completion tokens / wall time of the condition (the server's throughput)."""
    latency_mean_s: float
    latency_p50_s: float
    latency_p90_s: float
    ttft_mean_s: float
    decode_tokens_per_s_mean: float
    """Per request: (tokens - 1) / (latency - ttft), averaged (what one client sees after the first token)."""
    queue_mean_s: float
    """Mean wait inside the replica for the engine (from the server's metrics)."""
    tau: float | None
    """1 + accepted / drafts over the condition (None without speculative steps)."""
    acceptance_per_pos: list[float]


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url + "/metrics", timeout=60) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _delta(before: dict, after: dict, name: str, labels: tuple[tuple[str, str], ...]) -> float:
    return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)


def one_request(client: Any, model: str, prompt: str, max_tokens: int, speculative: bool) -> RequestResult:
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"speculative": speculative},
        )
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # counted as an error of the condition
        return RequestResult(False, time.perf_counter() - start, 0.0, 0, f"{type(err).__name__}: {err}")
    latency = time.perf_counter() - start
    return RequestResult(True, latency, ttft if ttft is not None else latency, tokens)


def run_condition(
    url: str,
    client: Any,
    model: str,
    prompts: Sequence[str],
    max_tokens: int,
    speculative: bool,
    concurrency: int,
) -> ConditionResult:
    before = _scrape(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(client, model, p, max_tokens, speculative), prompts))
    wall = time.perf_counter() - start
    after = _scrape(url)
    ok = [r for r in results if r.ok]
    lab = (("model_name", model),)
    drafts = _delta(before, after, "spec_decode_num_drafts_total", lab)
    accepted = _delta(before, after, "spec_decode_num_accepted_tokens_total", lab)
    per_pos, pos = [], 0
    while ("spec_decode_num_accepted_tokens_per_pos_total", (*lab, ("position", str(pos)))) in after:
        n = _delta(
            before, after, "spec_decode_num_accepted_tokens_per_pos_total", (*lab, ("position", str(pos)))
        )
        per_pos.append(n / drafts if drafts else 0.0)
        pos += 1
    queue_n = _delta(before, after, "request_queue_time_seconds_count", lab)
    rates = [
        (r.completion_tokens - 1) / (r.latency_s - r.ttft_s)
        for r in ok
        if r.completion_tokens > 1 and r.latency_s > r.ttft_s
    ]
    tokens = sum(r.completion_tokens for r in ok)
    return ConditionResult(
        speculative=speculative,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        wall_s=wall,
        completion_tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        latency_mean_s=statistics.fmean([r.latency_s for r in ok]) if ok else 0.0,
        latency_p50_s=_percentile([r.latency_s for r in ok], 0.5),
        latency_p90_s=_percentile([r.latency_s for r in ok], 0.9),
        ttft_mean_s=statistics.fmean([r.ttft_s for r in ok]) if ok else 0.0,
        decode_tokens_per_s_mean=statistics.fmean(rates) if rates else 0.0,
        queue_mean_s=_delta(before, after, "request_queue_time_seconds_sum", lab) / queue_n
        if queue_n
        else 0.0,
        tau=1.0 + accepted / drafts if drafts else None,
        acceptance_per_pos=per_pos,
    )


def batching_verdict(cells: Sequence[ConditionResult]) -> dict[str, Any]:
    """Compare concurrency 1 and the highest concurrency with speculation off.

    One by one: at high concurrency requests wait in the replica for the engine (mean queue time over a
    quarter of a lone request's latency) and, once running, decode about as fast per request as a lone
    one (>= 0.7x): they do not share the engine. Batching or time-slicing would show the opposite: little
    queueing, and each request's decode rate falling as the engine is shared. Aggregate tokens/s is
    reported but not used: on a shared machine it moves with the machine's load between conditions."""
    plain = sorted((c for c in cells if not c.speculative), key=lambda c: c.concurrency)
    if len(plain) < 2:
        return {"verdict": "not measured (needs two concurrency levels)"}
    lo, hi = plain[0], plain[-1]
    ratio = hi.tokens_per_s / lo.tokens_per_s if lo.tokens_per_s else 0.0
    rate = hi.decode_tokens_per_s_mean / lo.decode_tokens_per_s_mean if lo.decode_tokens_per_s_mean else 0.0
    one_by_one = hi.queue_mean_s > 0.25 * lo.latency_mean_s and rate >= 0.7
    return {
        "verdict": "one by one (no batching across requests)"
        if one_by_one
        else "concurrent (requests share the engine)",
        "throughput_ratio": ratio,
        "decode_rate_ratio": rate,
        "concurrency": [lo.concurrency, hi.concurrency],
        "queue_mean_s_at_high_concurrency": hi.queue_mean_s,
        "latency_mean_s_at_concurrency_1": lo.latency_mean_s,
    }


def bench_config(
    path: Path, drafter: str | None, dtype: str | None, tree: str | None, replicas: int, port: int
) -> dict[str, Any]:
    """The Serve config with the first application's first model adjusted for the benchmark."""
    raw = copy.deepcopy(yaml.safe_load(path.read_text()))
    raw.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    app = raw["applications"][0]
    model = app["args"]["models"][0]
    if drafter is not None:
        model["drafter"] = drafter
    if dtype is not None:
        model["dtype"] = dtype
    if tree is not None:
        model["tree"] = tree
    model["autoscaling"] = {
        **model.get("autoscaling", {}),
        "min_replicas": replicas,
        "max_replicas": replicas,
        "initial_replicas": replicas,
    }
    app["args"]["models"] = [model]
    app["args"].pop("api_key_env", None)
    return raw


def drafter_card(drafter: str | None) -> str:
    """How the drafter came to be, from its checkpoint card: an untrained one says so."""
    if drafter in (None, "none"):
        return "no drafter: speculation on and off both decode plainly"
    from deploy.config import ModelConfig
    from falcon_core.checkpoint import read_drafter_config

    path = ModelConfig(name="bench", drafter=drafter).drafter_path()
    _, _, card = read_drafter_config(path)
    if not card:
        return "no card: an untrained drafter (measures overhead, not speed-up)"
    return json.dumps({k: v for k, v in card.items() if k != "acceptance"})


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# HTTP benchmark ({report['time']})",
        "",
        f"model `{report['model']}`, drafter `{report['drafter']}`, dtype {report['dtype']}, "
        f"{report['prompts']} MT-Bench prompts x max {report['max_tokens']} tokens, greedy, "
        f"{report['replicas']} replica(s)",
        "",
        f"drafter card: {report['drafter_card']}",
        "",
        "| speculative | clients | tokens/s | latency mean (s) | p90 (s) | TTFT mean (s) | decode tok/s per client "
        "| queue mean (s) | tau | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["conditions"]:
        tau = f"{c['tau']:.2f}" if c["tau"] is not None else "-"
        lines.append(
            f"| {'on' if c['speculative'] else 'off'} | {c['concurrency']} | {c['tokens_per_s']:.2f} "
            f"| {c['latency_mean_s']:.2f} | {c['latency_p90_s']:.2f} | {c['ttft_mean_s']:.2f} "
            f"| {c['decode_tokens_per_s_mean']:.2f} | {c['queue_mean_s']:.2f} | {tau} | {c['errors']} |"
        )
    b = report["batching"]
    lines += ["", f"Batching: {b['verdict']}"]
    if "throughput_ratio" in b:
        lines.append(
            f"(mean queue at {b['concurrency'][1]} clients {b['queue_mean_s_at_high_concurrency']:.2f} s vs "
            f"{b['latency_mean_s_at_concurrency_1']:.2f} s latency at 1 client; per-request decode tok/s "
            f"at {b['concurrency'][1]} clients / at {b['concurrency'][0]}: {b.get('decode_rate_ratio', 0.0):.2f}; "
            f"aggregate tokens/s ratio {b['throughput_ratio']:.2f})"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.config import PROJECT_ROOT

    p = argparse.ArgumentParser(prog="python -m bench.http_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "deploy" / "serve_config.yaml")
    p.add_argument("--drafter", default=None, help="override the first model's drafter (a folder, or none)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tree", default=None)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--url", default=None, help="bench a running server instead of starting one")
    p.add_argument("--model", default=None, help="model name (with --url; default: the config's first)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from openai import OpenAI

    from falcon_core.data import read_mtbench

    prompts = [q.turns[0] for q in read_mtbench()][: args.prompts]
    raw = bench_config(args.config, args.drafter, args.dtype, args.tree, args.replicas, args.port)
    model_cfg = raw["applications"][0]["args"]["models"][0]
    model = args.model or model_cfg["name"]
    url = args.url or f"http://127.0.0.1:{args.port}"
    started = args.url is None
    if started:
        from deploy.cli import deploy, load_config, start_ray

        start_ray(None, None)
        t0 = time.perf_counter()
        deploy(load_config(raw))
        print(f"app up in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        one_request(client, model, "Hello", 4, True)  # warm-up
        cells = []
        for concurrency in args.concurrency:
            for speculative in (True, False):
                cell = run_condition(url, client, model, prompts, args.max_tokens, speculative, concurrency)
                print(json.dumps(asdict(cell)), flush=True)
                cells.append(cell)
    finally:
        if started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "time": stamp,
        "model": model,
        "drafter": model_cfg.get("drafter"),
        "drafter_card": drafter_card(model_cfg.get("drafter")),
        "dtype": model_cfg.get("dtype"),
        "tree": model_cfg.get("tree"),
        "replicas": args.replicas,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "conditions": [asdict(c) for c in cells],
        "batching": batching_verdict(cells),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"http_bench-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    (args.out / f"http_bench-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
