"""Prometheus metrics of the serving application, exposed by the router at `GET /metrics`.

Speculative-decoding counters use vLLM's names and meanings (prometheus-client appends `_total` to a
counter's name in the exposition, as vLLM's do), labelled by `model_name`:
- `spec_decode_num_drafts`: speculative steps (one drafted tree verified per step);
- `spec_decode_num_draft_tokens`: drafted positions = the sum over steps of the tree's depth (a tree's
  extra width is not counted, so acceptance rate = accepted / draft tokens and the mean accepted length
  = 1 + accepted / drafts = tau, as vLLM computes them);
- `spec_decode_num_accepted_tokens`: drafted tokens the target accepted;
- `spec_decode_num_accepted_tokens_per_pos{position}`: accepted tokens at each depth (0-based).

Request metrics (vLLM's names where vLLM has one): `e2e_request_latency_seconds`,
`time_to_first_token_seconds`, `request_queue_time_seconds` (waiting for a busy engine),
`request_decode_tokens_per_second` (tokens after the first / time after the first), token counters,
finished requests by finish reason, error responses by status, requests re-sent after a lost
replica (`request_retries`), and requests in flight.

The counts are recorded by the router from the `GenerationStats` each request returns, so one registry
sees every engine replica. Each `ServeMetrics` has its own registry (no global state).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from falcon_core.metrics import GenerationStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_RATE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


@dataclass(frozen=True)
class RequestRecord:
    """What the router measured for one finished request."""

    model: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    """From the router receiving the request to the last token."""
    ttft_s: float
    """From the router receiving the request to the first token."""
    queue_s: float
    """Time the request waited in the engine replica for the engine to be free."""
    stats: GenerationStats


class ServeMetrics:
    """The application's metrics in a private registry; `render()` gives the Prometheus text format."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.num_drafts = Counter(
            "spec_decode_num_drafts", "Speculative steps (drafts verified).", m, registry=r
        )
        self.num_draft_tokens = Counter(
            "spec_decode_num_draft_tokens", "Drafted positions (tree depth per step).", m, registry=r
        )
        self.num_accepted_tokens = Counter(
            "spec_decode_num_accepted_tokens", "Drafted tokens accepted by the target.", m, registry=r
        )
        self.accepted_per_pos = Counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens per position (depth, 0-based).",
            [*m, "position"],
            registry=r,
        )
        self.latency = Histogram(
            "e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Arrival to first token.", m, buckets=_TTFT_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "request_queue_time_seconds",
            "Wait for a busy engine inside a replica.",
            m,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "request_decode_tokens_per_second",
            "Per request: tokens after the first / time after the first.",
            m,
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.", m, registry=r)
        self.target_forwards = Counter(
            "target_decode_forwards", "Target forwards in decode steps (prefill excluded).", m, registry=r
        )
        self.success = Counter(
            "request_success", "Finished requests by finish reason.", [*m, "finished_reason"], registry=r
        )
        self.errors = Counter("request_errors", "Error responses by HTTP status.", ["status"], registry=r)
        self.retries = Counter(
            "request_retries",
            "Requests re-sent after their engine replica was lost before any output reached the client.",
            m,
            registry=r,
        )
        self.running = Gauge("num_requests_running", "Requests in flight at the router.", m, registry=r)

    def record(self, rec: RequestRecord) -> None:
        s, model = rec.stats, rec.model
        self.num_drafts.labels(model).inc(s.speculative_steps)
        self.num_draft_tokens.labels(model).inc(sum(s.drafts_per_depth))
        self.num_accepted_tokens.labels(model).inc(sum(s.accepted_per_depth))
        for pos, n in enumerate(s.accepted_per_depth):
            self.accepted_per_pos.labels(model, str(pos)).inc(n)
        self.latency.labels(model).observe(rec.latency_s)
        self.ttft.labels(model).observe(rec.ttft_s)
        self.queue.labels(model).observe(rec.queue_s)
        if rec.completion_tokens > 1 and rec.latency_s > rec.ttft_s:
            self.decode_rate.labels(model).observe((rec.completion_tokens - 1) / (rec.latency_s - rec.ttft_s))
        self.prompt_tokens.labels(model).inc(rec.prompt_tokens)
        self.generation_tokens.labels(model).inc(rec.completion_tokens)
        self.target_forwards.labels(model).inc(s.target_forwards)
        self.success.labels(model, rec.finish_reason).inc()

    def record_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
