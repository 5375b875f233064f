"""The HTTP benchmark's pure parts: config pinning, the batching verdict, the report."""

from __future__ import annotations

from dataclasses import asdict, replace

from bench.http_bench import ConditionResult, batching_verdict, bench_config, render_markdown
from deploy.cli import load_config
from deploy.config import PROJECT_ROOT

CELL = ConditionResult(
    speculative=False,
    concurrency=1,
    requests=4,
    errors=0,
    wall_s=10.0,
    completion_tokens=100,
    tokens_per_s=10.0,
    latency_mean_s=2.5,
    latency_p50_s=2.5,
    latency_p90_s=2.6,
    ttft_mean_s=0.2,
    decode_tokens_per_s_mean=10.5,
    queue_mean_s=0.0,
    tau=None,
    acceptance_per_pos=[],
)


def test_bench_config_pins_replicas_and_stays_a_valid_serve_config() -> None:
    raw = bench_config(PROJECT_ROOT / "deploy" / "serve_config.yaml", "none", "fp32", "chain-2", 1, 8123)
    model = raw["applications"][0]["args"]["models"][0]
    assert model["autoscaling"]["min_replicas"] == model["autoscaling"]["max_replicas"] == 1
    assert (model["drafter"], model["dtype"], model["tree"]) == ("none", "fp32", "chain-2")
    assert raw["http_options"] == {**raw["http_options"], "host": "127.0.0.1", "port": 8123}
    load_config(raw)


def test_verdict_one_by_one_when_throughput_is_flat_and_requests_queue() -> None:
    busy = replace(CELL, concurrency=4, tokens_per_s=10.5, queue_mean_s=3.5, latency_mean_s=6.0)
    assert batching_verdict([CELL, busy])["verdict"].startswith("one by one")
    # The machine got quieter during the 4-client run: more tokens/s, still queued and undiluted.
    quieter = replace(busy, tokens_per_s=14.0, decode_tokens_per_s_mean=14.0)
    assert batching_verdict([CELL, quieter])["verdict"].startswith("one by one")
    batched = replace(CELL, concurrency=4, tokens_per_s=30.0, queue_mean_s=0.0)
    assert batching_verdict([CELL, batched])["verdict"].startswith("concurrent")
    # Time-sliced: requests start at once and each decodes at a quarter of the lone rate.
    sliced = replace(CELL, concurrency=4, queue_mean_s=3.0, decode_tokens_per_s_mean=2.6)
    assert batching_verdict([CELL, sliced])["verdict"].startswith("concurrent")
    assert batching_verdict([CELL])["verdict"].startswith("not measured")


def test_markdown_has_one_row_per_condition() -> None:
    cells = [CELL, replace(CELL, speculative=True, tau=1.5)]
    report = {
        "time": "t",
        "model": "m",
        "drafter": None,
        "drafter_card": "none",
        "dtype": "bf16",
        "prompts": 4,
        "max_tokens": 32,
        "replicas": 1,
        "conditions": [asdict(c) for c in cells],
        "batching": batching_verdict(cells),
    }
    md = render_markdown(report)
    assert md.count("\n| o") == 2 and "| 1.50 |" in md
