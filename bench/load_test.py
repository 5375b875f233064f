"""Reliability of the Serve endpoint, measured over HTTP: concurrent load, then a replica killed mid-load.

    python -m bench.load_test [--config deploy/serve_config.yaml] [--drafter DIR|none] [--replicas 2]
                              [--clients 16] [--requests 25] [--short-tokens 8] [--long-tokens 32]
                              [--bound-s 120] [--fault-clients 8] [--fault-tokens 32] [--no-fault]

Without `--url` it starts the application from the Serve config on a local Ray (127.0.0.1), with the
first model's replica count pinned to `--replicas` (the fault phase needs 2: one is killed, the other
keeps serving while Serve replaces it).

Load phase: `--clients` threads each send `--requests` greedy requests one after another, a fixed mix of
chat and text completions, streamed and unary, short and long `max_tokens`, over a few prompts, so every
(endpoint, prompt, max_tokens) is asked both streamed and unary. Per request: status, latency, time to
first token (streams), completion tokens, text. Reported: errors, hangs, latency p50 / p99 / max,
requests/s and tokens/s, and how many (endpoint, prompt, max_tokens) keys got more than one text
(greedy decoding should give one).

Terms (both phases):
- ok: status 200 and a complete response (unary: a JSON body; stream: a finish reason, then `[DONE]`);
- clean error: an HTTP error status with an OpenAI-style JSON body `{"error": {...}}`, or, once a stream
  has started (status 200 already sent), an SSE event holding that JSON body followed by `[DONE]`;
- hang: no complete response or clean error within `--bound-s` of sending (socket timeout, or a total
  latency over the bound); anything else (malformed body, cut stream) is a broken response.

Fault phase: `--fault-clients` threads send streamed and unary requests in a loop; after `--kill-after-s`
one engine replica's actor is killed (`ray.kill`, found by its Serve actor name in namespace `serve`).
Measured: how the requests in flight at the kill ended (ok / clean error / hang / broken), how many the
router re-sent because their replica died before any output reached the client (its `request_retries`
counter), how long until `serve.status()` shows the deployment's replicas RUNNING again with a new
replica (recovery time), the requests sent during recovery, and a burst of requests after recovery, which
must all succeed.

Results go to `bench/results/load_test-<time>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

RESULTS = Path(__file__).resolve().parent / "results"

Verdict = Literal["ok", "clean_error", "hang", "broken"]


@dataclass(frozen=True)
class RequestSpec:
    """One greedy request: endpoint, prompt, `max_tokens`, streamed or not."""

    endpoint: Literal["chat", "completion"]
    prompt: str
    max_tokens: int
    stream: bool

    @property
    def key(self) -> tuple[str, str, int]:
        """Requests with the same key must give the same text under greedy decoding."""
        return (self.endpoint, self.prompt, self.max_tokens)

    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": 0}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


@dataclass(frozen=True)
class Outcome:
    """How one request ended. Times are `time.monotonic()` values."""

    spec: RequestSpec
    verdict: Verdict
    status: int
    """HTTP status (0 when no response came)."""
    sent: float
    ended: float
    ttft_s: float | None = None
    """Streams: time to the first event with text."""
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.sent


@dataclass(frozen=True)
class StreamResult:
    """What a server-sent event stream held."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    error: dict[str, Any] | None
    """The JSON error event's `error` object, if one came."""
    done: bool
    """`data: [DONE]` came."""
    first_text_at: float | None
    """`time.monotonic()` at the first event with text."""


def read_sse(lines: Iterable[bytes], endpoint: str) -> StreamResult:
    """Parse an OpenAI-style event stream (`data: <json>` lines, ending with `data: [DONE]`)."""
    parts: list[str] = []
    finish, tokens, error, first = None, 0, None, None
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            return StreamResult("".join(parts), finish, tokens, error, True, first)
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            continue
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
            if text:
                parts.append(text)
                first = first if first is not None else time.monotonic()
            finish = choice.get("finish_reason") or finish
    return StreamResult("".join(parts), finish, tokens, error, False, first)


def _is_error_body(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]


def send(url: str, model: str, spec: RequestSpec, bound_s: float) -> Outcome:
    """Send `spec` and classify how it ended; never takes much longer than `bound_s`."""
    parsed = urlparse(url)
    sent = time.monotonic()

    def done(verdict: Verdict, status: int, error: str = "", **kw: Any) -> Outcome:
        ended = time.monotonic()
        if verdict in ("ok", "clean_error") and ended - sent > bound_s:
            verdict, error = "hang", f"ended after {ended - sent:.1f} s (bound {bound_s:.0f} s); {error}"
        return Outcome(spec, verdict, status, sent, ended, error=error, **kw)

    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=bound_s)
    try:
        conn.request(
            "POST",
            spec.path(),
            body=json.dumps(spec.body(model)),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200 or not spec.stream:
            raw = resp.read()
            try:
                body = json.loads(raw)
            except ValueError:
                return done("broken", resp.status, f"not JSON: {raw[:200]!r}")
            if resp.status != 200:
                if _is_error_body(body):
                    return done("clean_error", resp.status, body["error"]["message"])
                return done("broken", resp.status, f"error without an OpenAI error body: {raw[:200]!r}")
            choice = body["choices"][0]
            text = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
            return done(
                "ok",
                200,
                text=text,
                finish_reason=choice["finish_reason"],
                completion_tokens=body["usage"]["completion_tokens"],
            )
        stream = read_sse(resp.fp, spec.endpoint)
        ttft = None if stream.first_text_at is None else stream.first_text_at - sent
        if stream.error is not None and stream.done and "message" in stream.error:
            return done(
                "clean_error", 200, f"in stream: {stream.error['message']}", ttft_s=ttft, text=stream.text
            )
        if not stream.done or stream.finish_reason is None:
            return done("broken", 200, f"stream cut (done={stream.done}, finish={stream.finish_reason})")
        return done(
            "ok",
            200,
            ttft_s=ttft,
            text=stream.text,
            finish_reason=stream.finish_reason,
            completion_tokens=stream.completion_tokens,
        )
    except TimeoutError:
        return done("hang", 0, f"no response within {bound_s:.0f} s")
    except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
        return done("broken", 0, f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def plan_requests(
    clients: int, per_client: int, prompts: Sequence[str], short_tokens: int, long_tokens: int
) -> list[list[RequestSpec]]:
    """A fixed mix per client: streamed / unary alternate, chat / completion every two, every third
    request long, prompts in turn; so each (endpoint, prompt, max_tokens) comes both streamed and unary."""
    plan = []
    for c in range(clients):
        specs = []
        for r in range(per_client):
            i = c * per_client + r
            specs.append(
                RequestSpec(
                    endpoint="chat" if (i // 2) % 2 == 0 else "completion",
                    prompt=prompts[(i // 4) % len(prompts)],
                    max_tokens=long_tokens if r % 3 == 2 else short_tokens,
                    stream=i % 2 == 0,
                )
            )
        plan.append(specs)
    return plan


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0 for no data."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else 0.0


def text_mismatches(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Keys whose successful requests gave more than one text (greedy: should be none)."""
    texts: dict[tuple[str, str, int], dict[str, list[bool]]] = {}
    for o in outcomes:
        if o.verdict == "ok":
            texts.setdefault(o.spec.key, {}).setdefault(o.text, []).append(o.spec.stream)
    return [
        {
            "endpoint": k[0],
            "prompt": k[1][:60],
            "max_tokens": k[2],
            "texts": {t[:80]: s for t, s in v.items()},
        }
        for k, v in texts.items()
        if len(v) > 1
    ]


def summarize(outcomes: Sequence[Outcome], wall_s: float) -> dict[str, Any]:
    """Counts by verdict, latency percentiles, throughput."""
    ok = [o for o in outcomes if o.verdict == "ok"]
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    tokens = sum(o.completion_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "clean_errors": sum(o.verdict == "clean_error" for o in outcomes),
        "hangs": sum(o.verdict == "hang" for o in outcomes),
        "broken": sum(o.verdict == "broken" for o in outcomes),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "latency_max_s": max((o.latency_s for o in outcomes), default=0.0),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "errors": [o.error for o in outcomes if o.verdict != "ok"][:20],
    }


def run_load(url: str, model: str, plan: Sequence[Sequence[RequestSpec]], bound_s: float) -> dict[str, Any]:
    """Every client sends its requests one after another, all clients at once."""
    start = time.monotonic()
    with ThreadPoolExecutor(len(plan)) as pool:
        per_client = list(pool.map(lambda specs: [send(url, model, s, bound_s) for s in specs], plan))
    wall = time.monotonic() - start
    outcomes = [o for client in per_client for o in client]
    return {
        "clients": len(plan),
        "requests_per_client": len(plan[0]) if plan else 0,
        "bound_s": bound_s,
        **summarize(outcomes, wall),
        "streamed": sum(o.spec.stream for o in outcomes),
        "text_mismatches": text_mismatches(outcomes),
    }


# ------------------------------------------------------------------------------------------------------
# Replicas: counted through serve.status(), killed through their actor names (namespace "serve").


def running_replicas(app: str, deployment: str) -> int:
    """RUNNING replicas of `deployment` in `app`, per `serve.status()`."""
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of `deployment` (Serve names them `SERVE_REPLICA::app#dep#id`)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    )


def kill_replica(name: str) -> None:
    """Kill a replica actor the way a crashed process would end (no restart by Ray; Serve replaces it)."""
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def wait_until(cond: Callable[[], bool], timeout_s: float, poll_s: float = 0.25) -> float | None:
    """Seconds until `cond()` held, or None after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if cond():
            return time.monotonic() - start
        time.sleep(poll_s)
    return None


def router_counter(url: str, name: str, model: str) -> float:
    """A counter of the router's `/metrics` for `model` (e.g. `request_retries_total`); 0 when absent."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url + "/metrics", timeout=60) as r:
        families = text_string_to_metric_families(r.read().decode())
    values = [
        s.value for f in families for s in f.samples if s.name == name and s.labels.get("model_name") == model
    ]
    return values[0] if values else 0.0


def run_fault(
    url: str,
    model: str,
    app: str,
    deployment: str,
    specs: Sequence[RequestSpec],
    bound_s: float,
    kill_after_s: float,
    recovery_timeout_s: float,
) -> dict[str, Any]:
    """`len(specs)` clients loop over their request until recovery; one replica is killed mid-load."""
    replicas = replica_actor_names(app, deployment)
    target = running_replicas(app, deployment)
    if len(replicas) < 2 or target < 2:
        raise RuntimeError(f"the fault phase needs >= 2 running replicas, found {replicas}")
    stop = threading.Event()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client(spec: RequestSpec) -> None:
        while not stop.is_set():
            o = send(url, model, spec, bound_s)
            with lock:
                outcomes.append(o)

    retries_before = router_counter(url, "request_retries_total", model)
    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in specs]
    for t in threads:
        t.start()
    time.sleep(kill_after_s)
    victim = replicas[0]
    killed_at = time.monotonic()
    kill_replica(victim)

    def recovered() -> bool:
        names = replica_actor_names(app, deployment)
        return victim not in names and len(names) >= target and running_replicas(app, deployment) >= target

    recovery_s = wait_until(recovered, recovery_timeout_s)
    recovered_at = time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=bound_s + 10)
    still_running = sum(t.is_alive() for t in threads)
    retried = router_counter(url, "request_retries_total", model) - retries_before
    after = run_load(url, model, [[s] for s in specs], bound_s) if recovery_s is not None else None
    with lock:
        done = list(outcomes)
    in_flight = [o for o in done if o.sent < killed_at < o.ended]
    during = [o for o in done if killed_at <= o.sent < recovered_at]
    return {
        "replicas_before": len(replicas),
        "killed": victim,
        "kill_after_s": kill_after_s,
        "bound_s": bound_s,
        "recovery_s": recovery_s,
        "clients_stuck_after_recovery": still_running,
        "in_flight_at_kill": _counts(in_flight),
        "in_flight_errors": [f"{o.status}: {o.error}" for o in in_flight if o.verdict != "ok"],
        "retried_by_router": int(retried),
        "sent_during_recovery": _counts(during),
        "all_requests": _counts(done),
        "latency_max_s": max((o.latency_s for o in done), default=0.0),
        "after_recovery": None
        if after is None
        else {
            k: after[k]
            for k in ("requests", "ok", "clean_errors", "hangs", "broken", "latency_max_s", "errors")
        },
    }


def _counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    out = {v: 0 for v in ("ok", "clean_error", "hang", "broken")}
    for o in outcomes:
        out[o.verdict] += 1
    return {"total": len(outcomes), **out}


# ------------------------------------------------------------------------------------------------------
# Report


def render_markdown(report: dict[str, Any]) -> str:
    load, fault = report.get("load"), report.get("fault")
    lines = [
        f"# Load and fault test ({report['time']})",
        "",
        f"model `{report['model']}`, drafter `{report['drafter']}`, dtype {report['dtype']}, "
        f"{report['replicas']} replica(s), greedy; per-request bound {report['bound_s']:.0f} s",
        "",
    ]
    if load:
        lines += [
            f"## Load: {load['clients']} clients x {load['requests_per_client']} requests "
            f"(max_tokens {report['short_tokens']} / {report['long_tokens']}, {load['streamed']} streamed)",
            "",
            "| requests | ok | errors | hangs | broken | p50 (s) | p99 (s) | max (s) | TTFT p50 (s) "
            "| req/s | tokens/s | wall (s) | stream/unary text mismatches |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {load['requests']} | {load['ok']} | {load['clean_errors']} | {load['hangs']} | {load['broken']} "
            f"| {load['latency_p50_s']:.2f} | {load['latency_p99_s']:.2f} | {load['latency_max_s']:.2f} "
            f"| {load['ttft_p50_s']:.2f} | {load['requests_per_s']:.2f} | {load['tokens_per_s']:.1f} "
            f"| {load['wall_s']:.0f} | {len(load['text_mismatches'])} |",
            "",
        ]
    if fault:
        rec = "not within the timeout" if fault["recovery_s"] is None else f"{fault['recovery_s']:.1f} s"
        lines += [
            f"## Fault: one of {fault['replicas_before']} replicas killed after {fault['kill_after_s']:.0f} s "
            "of load",
            "",
            f"Recovery (kill -> `serve.status()` shows {fault['replicas_before']} RUNNING with a new replica): {rec}",
            "",
            "| requests | total | ok | clean error | hang | broken |",
            "|---|---|---|---|---|---|",
        ]
        for name, key in (
            ("in flight at the kill", "in_flight_at_kill"),
            ("sent during recovery", "sent_during_recovery"),
            ("all, during the fault phase", "all_requests"),
        ):
            c = fault[key]
            lines.append(
                f"| {name} | {c['total']} | {c['ok']} | {c['clean_error']} | {c['hang']} | {c['broken']} |"
            )
        a = fault["after_recovery"]
        if a is not None:
            lines.append(
                f"| after recovery | {a['requests']} | {a['ok']} | {a['clean_errors']} | {a['hangs']} "
                f"| {a['broken']} |"
            )
        lines += ["", f"Longest request in the fault phase: {fault['latency_max_s']:.1f} s"]
        if "retried_by_router" in fault:
            lines += [
                "",
                f"Re-sent by the router (replica lost before any output reached the client): "
                f"{fault['retried_by_router']}",
            ]
        if fault["in_flight_errors"]:
            lines += [
                "",
                "Errors of the in-flight requests: " + "; ".join(sorted(set(fault["in_flight_errors"]))),
            ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.config import PROJECT_ROOT

    p = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "deploy" / "serve_config.yaml")
    p.add_argument("--drafter", default=None, help="override the first model's drafter (a folder, or none)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--short-tokens", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=32)
    p.add_argument("--bound-s", type=float, default=120.0, help="a request not ended by then is a hang")
    p.add_argument("--fault-clients", type=int, default=8)
    p.add_argument("--fault-tokens", type=int, default=32)
    p.add_argument("--kill-after-s", type=float, default=5.0)
    p.add_argument("--recovery-timeout-s", type=float, default=180.0)
    p.add_argument("--no-fault", action="store_true")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (replicas + router must fit)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from bench.http_bench import bench_config
    from falcon_core.data import read_mtbench

    prompts = [q.turns[0] for q in read_mtbench()][: args.prompts]
    raw = bench_config(args.config, args.drafter, None, None, args.replicas, args.port)
    app = raw["applications"][0]["name"]
    model_cfg = raw["applications"][0]["args"]["models"][0]
    model = model_cfg["name"]
    url = f"http://127.0.0.1:{args.port}"

    import ray
    from ray import serve

    from deploy.cli import deploy, load_config, start_ray
    from deploy.config import ModelConfig

    deployment = ModelConfig(name=model).deployment_name
    start_ray(None, args.num_cpus)
    t0 = time.monotonic()
    deploy(load_config(raw))
    print(f"app up in {time.monotonic() - t0:.1f} s", flush=True)
    report: dict[str, Any] = {
        "time": time.strftime("%Y%m%d-%H%M%S"),
        "model": model,
        "drafter": model_cfg.get("drafter"),
        "dtype": model_cfg.get("dtype"),
        "replicas": args.replicas,
        "bound_s": args.bound_s,
        "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens,
        "prompts": len(prompts),
    }
    try:
        send(url, model, RequestSpec("chat", "Hello", 2, False), args.bound_s)  # warm-up
        plan = plan_requests(args.clients, args.requests, prompts, args.short_tokens, args.long_tokens)
        report["load"] = run_load(url, model, plan, args.bound_s)
        print(json.dumps({k: v for k, v in report["load"].items() if k != "errors"}), flush=True)
        if not args.no_fault:
            specs = [
                RequestSpec(
                    "chat" if i % 2 else "completion",
                    prompts[i % len(prompts)],
                    args.fault_tokens,
                    i % 2 == 0,
                )
                for i in range(args.fault_clients)
            ]
            report["fault_tokens"] = args.fault_tokens
            report["fault"] = run_fault(
                url, model, app, deployment, specs, args.bound_s, args.kill_after_s, args.recovery_timeout_s
            )
            print(json.dumps(report["fault"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"load_test-{report['time']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
