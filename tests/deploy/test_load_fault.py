"""The Serve app under concurrent load and under a replica killed mid-load, over HTTP on 127.0.0.1, with
`bench.load_test` as the client; the router's retry of requests whose replica died before any output
reached the client (a one-replica application, the official `openai` client); plus the load client's pure
parts (event-stream parsing, the request mix, percentiles, the text-consistency check).

The served model is a tiny random fp32 Llama (SmolLM2's tokenizer), two engine replicas pinned, plain
greedy decoding, so the load is about the server (routing, queueing, streaming) rather than the model; the
retry test adds a second application with one replica of it on the same Serve instance.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench.load_test import (
    Outcome,
    RequestSpec,
    kill_replica,
    percentile,
    plan_requests,
    read_sse,
    replica_actor_names,
    run_fault,
    run_load,
    running_replicas,
    send,
    text_mismatches,
    wait_until,
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
    within the bound as a complete response or a clean error event in a started stream (those queued in
    the killed replica are re-sent by the router, not failed), Serve brings a new replica up, and every
    request after that succeeds."""
    assert running_replicas(APP, DEPLOYMENT) == 2
    before = replica_actor_names(APP, DEPLOYMENT)
    # All streamed: the request the killed replica is decoding has already sent status 200 and text, so
    # it must end with a JSON error event and [DONE]; those queued in that replica had sent nothing and
    # are re-sent by the router to a live replica, so no request ends with an HTTP error status.
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
    assert all(e.startswith("200: ") for e in fault["in_flight_errors"]), fault["in_flight_errors"]
    everything = fault["all_requests"]
    assert everything["hang"] == everything["broken"] == 0
    assert fault["latency_max_s"] <= BOUND_S and fault["clients_stuck_after_recovery"] == 0
    assert fault["after_recovery"]["ok"] == fault["after_recovery"]["requests"] == 6, fault["after_recovery"]
    assert _running_at_router(url) == 0, "the router still holds requests open after the fault"


# ------------------------------------------------------------------------------------------------------
# The router's retry: a replica lost before any output reached the client


ONE_APP, ONE_PREFIX = "falcon-one", "/one"


def _router_metric(url: str, name: str) -> float:
    """A sample of the router's /metrics for the model (0 when absent)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url + "/metrics", timeout=30) as r:
        families = text_string_to_metric_families(r.read().decode())
    values = [
        s.value for f in families for s in f.samples if s.name == name and s.labels.get("model_name") == MODEL
    ]
    return values[0] if values else 0.0


@pytest.fixture(scope="module")
def one_replica_url(url: str, tiny_serving_model: Path) -> Iterator[str]:
    """A second application on the same Serve instance (route prefix /one): one engine replica that
    accepts 4 requests at once (one decodes, the others wait in the replica)."""
    from ray import serve

    from deploy.router import build_app

    args = _config(0, tiny_serving_model)["applications"][0]["args"]
    args["models"][0].update(max_ongoing_requests=4, autoscaling={"min_replicas": 1, "max_replicas": 1})
    serve.run(build_app(args), name=ONE_APP, route_prefix=ONE_PREFIX, blocking=False)
    try:
        yield url + ONE_PREFIX
    finally:
        serve.delete(ONE_APP)


@pytest.mark.slow
def test_replica_lost_before_output_reached_the_client_is_retried(one_replica_url: str) -> None:
    """The only replica is killed (`ray.kill`): (1) while it streams request A and holds B (unary) and C
    (streamed) queued: A, which has sent text, ends with the JSON error event; B and C, which had sent
    nothing, are re-sent and complete on the replacement, B with the reference text; (2) while it decodes
    a non-streamed request D: D is re-sent from the start and returns the reference text; (3) twice
    while E decodes: one retry only, so E gets a 503 with an OpenAI error body."""
    from openai import APIError, InternalServerError, OpenAI

    client = OpenAI(base_url=one_replica_url + "/v1", api_key="unused", max_retries=0, timeout=BOUND_S * 3)
    long_tokens = 2000

    def unary(prompt: str) -> tuple[str, int]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=long_tokens, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    ref_b, ref_d = unary(PROMPTS[1]), unary(PROMPTS[3])
    assert ref_b[1] > 200 and ref_d[1] > 200, "the reference requests must run long enough to be killed"
    retries_before = _router_metric(one_replica_url, "request_retries_total")

    # (1) A streams; B and C queue behind it in the same replica; the replica is killed.
    (victim,) = replica_actor_names(ONE_APP, DEPLOYMENT)
    a = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=long_tokens, temperature=0, stream=True
    )
    a_text = next(iter(a)).choices[0].text
    results: dict[str, object] = {}

    def run(name: str, fn) -> None:
        try:
            results[name] = fn()
        except Exception as err:  # asserted on below
            results[name] = err

    def streamed_c() -> tuple[str, str | None]:
        parts = list(
            client.completions.create(
                model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True
            )
        )
        return "".join(p.choices[0].text for p in parts), parts[-1].choices[0].finish_reason

    threads = [
        threading.Thread(target=run, args=("B", lambda: unary(PROMPTS[1]))),
        threading.Thread(target=run, args=("C", streamed_c)),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # B and C reach the replica (it accepts 4) and wait behind A
    kill_replica(victim)
    with pytest.raises(APIError, match="the engine is unavailable"):
        for chunk in a:
            a_text += chunk.choices[0].text
    assert a_text, "A had streamed text before the kill"
    for t in threads:
        t.join(timeout=BOUND_S * 2)
    assert results.get("B") == ref_b, results.get("B")
    c = results.get("C")
    assert isinstance(c, tuple) and c[0] and c[1] in ("stop", "length"), c
    assert _router_metric(one_replica_url, "request_retries_total") - retries_before == 2

    # (2) D decodes (the router holds its first chunk) when the replacement replica is killed.
    (victim,) = replica_actor_names(ONE_APP, DEPLOYMENT)
    d = threading.Thread(target=run, args=("D", lambda: unary(PROMPTS[3])))
    d.start()
    started = wait_until(lambda: _router_metric(one_replica_url, "num_requests_running") == 1, 30, 0.05)
    assert started is not None, "D never started decoding"
    kill_replica(victim)
    d.join(timeout=BOUND_S * 2)
    assert results.get("D") == ref_d, results.get("D")
    assert _router_metric(one_replica_url, "request_retries_total") - retries_before == 3
    assert _router_metric(one_replica_url, "num_requests_running") == 0

    # (3) One retry only: E's replica is killed while E decodes, then its replacement too -> a 503.
    def retries() -> float:
        return _router_metric(one_replica_url, "request_retries_total") - retries_before

    def decoding() -> bool:
        return _router_metric(one_replica_url, "num_requests_running") == 1

    e = threading.Thread(target=run, args=("E", lambda: unary(PROMPTS[3])))
    e.start()
    for kill in range(2):
        assert wait_until(decoding, 120, 0.05) is not None, f"E never (re)started decoding before kill {kill}"
        (victim,) = replica_actor_names(ONE_APP, DEPLOYMENT)
        kill_replica(victim)
        if kill == 0:
            assert wait_until(lambda: retries() == 4, 30, 0.05) is not None, "E was not re-sent"
    e.join(timeout=BOUND_S * 2)
    err = results.get("E")
    assert isinstance(err, InternalServerError) and err.status_code == 503, err
    assert err.body["code"] is None and "the engine is unavailable" in err.body["message"], err.body
    assert retries() == 4
    assert wait_until(lambda: running_replicas(ONE_APP, DEPLOYMENT) == 1, 120) is not None
    assert unary(PROMPTS[3]) == ref_d  # and the deployment serves again
    assert _router_metric(one_replica_url, "num_requests_running") == 0
