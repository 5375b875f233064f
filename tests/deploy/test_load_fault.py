"""The Serve app under concurrent load and under a replica killed mid-load, over HTTP on 127.0.0.1, with
`bench.load_test` as the client; plus that client's pure parts (event-stream parsing, the request mix,
percentiles, the text-consistency check).

The served model is a tiny random fp32 Llama (SmolLM2's tokenizer), two engine replicas pinned, plain
greedy decoding, so the load is about the server (routing, queueing, streaming) rather than the model.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench.load_test import (
    Outcome,
    RequestSpec,
    percentile,
    plan_requests,
    read_sse,
    replica_actor_names,
    run_fault,
    run_load,
    running_replicas,
    send,
    text_mismatches,
)

APP = "falcon"
MODEL = "tiny"
DEPLOYMENT = "engine-tiny"
BOUND_S = 60.0
"""Every request must end (complete or clean error) within this; the tiny model answers in well under 1 s."""
PROMPTS = ["The capital of France is", "Count from one:", "Name three colours.", "Once upon a time"]


# ------------------------------------------------------------------------------------------------------
# Pure parts


def test_read_sse_collects_text_finish_usage_and_errors() -> None:
    chat = [
        b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n',
        b"\n",
        b'data: {"choices": [{"delta": {"content": "Hel"}, "finish_reason": null}]}\n',
        b'data: {"choices": [{"delta": {"content": "lo"}, "finish_reason": null}]}\n',
        b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n',
        b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n',
        b"data: [DONE]\n",
    ]
    got = read_sse(io.BytesIO(b"".join(chat)), "chat")
    assert (got.text, got.finish_reason, got.completion_tokens, got.done, got.error) == (
        "Hello",
        "length",
        2,
        True,
        None,
    )
    failed = [
        b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n',
        b'data: {"error": {"message": "x"}}\n',
    ]
    got = read_sse(io.BytesIO(b"".join([*failed, b"data: [DONE]\n"])), "completion")
    assert got.text == "a" and got.error == {"message": "x"} and got.done and got.finish_reason is None
    cut = read_sse(io.BytesIO(failed[0]), "completion")
    assert not cut.done


def test_plan_mixes_stream_endpoint_and_length_per_key() -> None:
    plan = plan_requests(8, 4, PROMPTS, 4, 16)
    specs = [s for client in plan for s in client]
    assert len(specs) == 32 and all(len(c) == 4 for c in plan)
    assert {s.endpoint for s in specs} == {"chat", "completion"}
    assert {s.max_tokens for s in specs} == {4, 16}
    by_key: dict[tuple, set[bool]] = {}
    for s in specs:
        by_key.setdefault(s.key, set()).add(s.stream)
    assert sum(modes == {True, False} for modes in by_key.values()) >= 4


def test_percentile_nearest_rank_and_mismatch_check() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 0.5) == 50.0 and percentile(xs, 0.99) == 99.0 and percentile(xs, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0 and percentile([], 0.5) == 0.0
    spec = RequestSpec("chat", "p", 4, True)
    same = [
        Outcome(spec, "ok", 200, 0.0, 1.0, text="a"),
        Outcome(replace(spec, stream=False), "ok", 200, 0, 1, text="a"),
    ]
    assert text_mismatches(same) == []
    differ = [*same, Outcome(replace(spec, stream=False), "ok", 200, 0.0, 1.0, text="b")]
    assert len(text_mismatches(differ)) == 1


# ------------------------------------------------------------------------------------------------------
# The real app


def _config(port: int, model: Path) -> dict:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 600},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "deploy.router:build_app",
                "args": {
                    "models": [
                        {
                            "name": MODEL,
                            "model": str(model),
                            "dtype": "fp32",
                            "torch_threads": 1,
                            "num_cpus": 0.5,
                            "max_ongoing_requests": 2,
                            "max_tokens_limit": 2048,
                            "autoscaling": {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2},
                        }
                    ]
                },
            }
        ],
    }


def _running_at_router(url: str) -> float:
    """The router's `num_requests_running` gauge for the model (requests it still holds open)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url + "/metrics", timeout=30) as r:
        families = text_string_to_metric_families(r.read().decode())
    values = [
        s.value
        for f in families
        for s in f.samples
        if s.name == "num_requests_running" and s.labels.get("model_name") == MODEL
    ]
    assert len(values) == 1, "no num_requests_running gauge for the model"
    return values[0]


@pytest.fixture(scope="module")
def url(local_serve, free_port, tiny_serving_model: Path) -> Iterator[str]:
    port = free_port()
    with local_serve(_config(port, tiny_serving_model)):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_concurrent_load_no_errors_bounded_and_stream_equals_unary(url: str) -> None:
    """8 clients x 4 requests at once: every request completes within the bound, and each greedy
    (endpoint, prompt, max_tokens) gives one text whether streamed or not."""
    result = run_load(url, MODEL, plan_requests(8, 4, PROMPTS, 4, 24), BOUND_S)
    assert result["requests"] == 32
    assert result["ok"] == 32, result["errors"]
    assert result["hangs"] == result["broken"] == result["clean_errors"] == 0
    assert result["latency_max_s"] <= BOUND_S
    assert result["streamed"] == 16 and result["completion_tokens"] > 0
    assert result["text_mismatches"] == []
    assert _running_at_router(url) == 0
    # A stream and a unary request for one key, side by side, give the same non-empty text.
    specs = [RequestSpec("completion", PROMPTS[0], 12, stream) for stream in (True, False)]
    streamed, unary = (send(url, MODEL, s, BOUND_S) for s in specs)
    assert streamed.verdict == unary.verdict == "ok"
    assert streamed.text == unary.text != "" and streamed.completion_tokens == unary.completion_tokens == 12


@pytest.mark.slow
def test_replica_killed_mid_load_every_request_ends_and_serve_recovers(url: str) -> None:
    """2 replicas; one is killed while 6 clients loop over long requests. Every request in flight ends
    within the bound as a complete response or a clean error (JSON body / JSON error event), Serve
    brings a new replica up, and every request after that succeeds."""
    assert running_replicas(APP, DEPLOYMENT) == 2
    before = replica_actor_names(APP, DEPLOYMENT)
    # All streamed: the request the killed replica is decoding has already sent status 200 and text, so
    # it must end with a JSON error event and [DONE]; those queued in that replica get a 503 before any.
    specs = [RequestSpec("chat" if i % 2 else "completion", PROMPTS[i % 4], 600, True) for i in range(6)]
    fault = run_fault(url, MODEL, APP, DEPLOYMENT, specs, BOUND_S, kill_after_s=2.0, recovery_timeout_s=120.0)
    print({k: fault[k] for k in ("recovery_s", "in_flight_at_kill", "in_flight_errors", "latency_max_s")})

    assert fault["recovery_s"] is not None, "Serve did not bring the replica back"
    after = replica_actor_names(APP, DEPLOYMENT)
    assert fault["killed"] in before and fault["killed"] not in after and len(after) == 2
    assert running_replicas(APP, DEPLOYMENT) == 2
    in_flight = fault["in_flight_at_kill"]
    assert in_flight["total"] >= 1
    assert in_flight["hang"] == in_flight["broken"] == 0, fault["in_flight_errors"]
    assert in_flight["ok"] + in_flight["clean_error"] == in_flight["total"]
    mid_stream = [
        e for e in fault["in_flight_errors"] if e.startswith("200: in stream: the engine is unavailable")
    ]
    assert mid_stream, fault["in_flight_errors"]
    everything = fault["all_requests"]
    assert everything["hang"] == everything["broken"] == 0
    assert fault["latency_max_s"] <= BOUND_S and fault["clients_stuck_after_recovery"] == 0
    assert fault["after_recovery"]["ok"] == fault["after_recovery"]["requests"] == 6, fault["after_recovery"]
    assert _running_at_router(url) == 0, "the router still holds requests open after the fault"
