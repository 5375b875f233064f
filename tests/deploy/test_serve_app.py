"""The real application on a local Ray (127.0.0.1), exercised over HTTP with the official `openai` client.

One module-scoped deployment serves two models from one config:
- `falcon-test`: SmolLM2-135M in fp32 with a drafter (a checkpoint made here from the target's last
  layer: it rarely guesses right, but every step drafts, verifies and counts), autoscaling 1..2 replicas;
- `plain-test`: the same target in bf16 without a drafter, one replica.
Greedy text over HTTP is compared with `Engine.generate` in this process (same dtype, one thread).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts Ray and three engine replicas (~1 min on 2 shared cores)

API_KEY_ENV = "FALCON_TEST_API_KEY"
API_KEY = "test-key-123"
MAX_BODY = 64 * 1024
FAST_AUTOSCALING_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    API_KEY_ENV: API_KEY,
}
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]


@dataclass
class Served:
    host: str
    port: int
    engine_fp32: object
    engine_bf16: object

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, api_key: str = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, data = self.raw("GET", "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(data.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def _make_drafter(folder: Path) -> None:
    """A real drafter checkpoint for SmolLM2, initialised from the target's last decoder layer."""
    import torch
    from transformers import AutoTokenizer

    from falcon_core.checkpoint import TargetIdentity, save_drafter
    from falcon_core.drafter import Drafter, DrafterConfig
    from falcon_core.resolve import DEFAULT_MODEL, resolve_model
    from falcon_core.target import load_target

    path = resolve_model(DEFAULT_MODEL)
    target = load_target(path, dtype="fp32", device="cpu")
    config = DrafterConfig.from_target(target.config, block_size=2)
    torch.manual_seed(0)
    drafter = Drafter(config)
    drafter.init_from_target_layer(target, len(target.layers) - 1)
    identity = TargetIdentity.of(DEFAULT_MODEL, target.config, AutoTokenizer.from_pretrained(path))
    save_drafter(folder, drafter, config, identity)


def _app_config(port: int, drafter: Path) -> dict:
    common = {"torch_threads": 1, "num_cpus": 0.5, "max_tokens_limit": 1024, "default_max_tokens": 8}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "falcon",
                "route_prefix": "/",
                "import_path": "deploy.router:build_app",
                "args": {
                    "api_key_env": API_KEY_ENV,
                    "max_body_bytes": MAX_BODY,
                    "models": [
                        {
                            "name": "falcon-test",
                            "drafter": str(drafter),
                            "dtype": "fp32",
                            "tree": "chain-2",
                            "max_ongoing_requests": 2,
                            **common,
                            "autoscaling": {
                                "min_replicas": 1,
                                "max_replicas": 2,
                                "target_ongoing_requests": 1,
                                "upscale_delay_s": 0,
                                "downscale_delay_s": 600,
                                "look_back_period_s": 11,
                            },
                        },
                        {
                            "name": "plain-test",
                            "dtype": "bf16",
                            **common,
                            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                        },
                    ],
                },
            }
        ],
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, local_serve, free_port) -> Iterator[Served]:
    import torch

    from falcon_core.generate import Engine

    drafter = tmp_path_factory.mktemp("deploy") / "drafter"
    _make_drafter(drafter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas run one thread; same arithmetic here
    fp32 = Engine.from_pretrained(drafter=str(drafter), dtype="fp32", tree="chain-2")
    bf16 = Engine.from_pretrained(dtype="bf16")
    port = free_port()
    try:
        with local_serve(_app_config(port, drafter), env=FAST_AUTOSCALING_ENV, num_cpus=4):
            yield Served("127.0.0.1", port, fp32, bf16)
    finally:
        torch.set_num_threads(threads)


def test_health_models_and_api_key(served: Served) -> None:
    from openai import AuthenticationError

    assert served.raw("GET", "/health", headers={"Authorization": ""})[0] == 200
    ids = [m.id for m in served.client().models.list().data]
    assert ids == ["falcon-test", "plain-test"]
    with pytest.raises(AuthenticationError) as info:
        served.client(api_key="wrong").models.list()
    assert info.value.status_code == 401
    status, data = served.raw("GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"


def test_completion_greedy_equals_engine_generate(served: Served) -> None:
    resp = served.client().completions.create(model="plain-test", prompt=PROMPT, max_tokens=12, temperature=0)
    ref = served.engine_bf16.generate(prompt=PROMPT, max_new_tokens=12)
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == ("length" if ref.finish_reason != "stop" else "stop")
    assert resp.usage.prompt_tokens == ref.prompt_tokens
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.object == "text_completion" and resp.model == "plain-test"


def test_stop_strings_and_seeded_sampling(served: Served) -> None:
    client = served.client()
    resp = client.completions.create(
        model="plain-test", prompt=PROMPT, max_tokens=12, temperature=0, stop=["."]
    )
    ref = served.engine_bf16.generate(prompt=PROMPT, max_new_tokens=12, stop=["."])
    assert resp.choices[0].text == ref.text and "." not in ref.text
    assert resp.choices[0].finish_reason == "stop" == ref.finish_reason
    sampled = [
        client.completions.create(
            model="plain-test",
            prompt=PROMPT,
            max_tokens=6,
            temperature=1.0,
            top_p=0.9,
            seed=11,
            extra_body={"top_k": 20},
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    # top_k = 1 leaves only the greedy token to sample, whatever the temperature and seed.
    ref6 = served.engine_bf16.generate(prompt=PROMPT, max_new_tokens=6)
    top1 = client.completions.create(
        model="plain-test", prompt=PROMPT, max_tokens=6, temperature=1.5, seed=5, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == ref6.text


def test_chat_speculative_greedy_equals_plain_engine(served: Served) -> None:
    """fp32: speculative greedy over HTTP == plain greedy in-process, token for token (lossless)."""
    client = served.client()
    ref = served.engine_fp32.generate(messages=CHAT, max_new_tokens=10, speculative=False)
    spec = client.chat.completions.create(model="falcon-test", messages=CHAT, max_tokens=10, temperature=0)
    plain = client.chat.completions.create(
        model="falcon-test", messages=CHAT, max_tokens=10, temperature=0, extra_body={"speculative": False}
    )
    assert spec.choices[0].message.content == ref.text
    assert plain.choices[0].message.content == ref.text
    assert spec.choices[0].message.role == "assistant"
    assert spec.usage.completion_tokens == len(ref.token_ids)
    assert spec.usage.total_tokens == spec.usage.prompt_tokens + spec.usage.completion_tokens


def test_streaming_chat_and_completion(served: Served) -> None:
    client = served.client()
    whole = client.chat.completions.create(model="falcon-test", messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="falcon-test",
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    ref = served.engine_bf16.generate(prompt=PROMPT, max_new_tokens=8)
    parts = list(
        client.completions.create(model="plain-test", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == ref.text
    assert len(parts) >= 2 and parts[-1].choices[0].finish_reason is not None


def test_metrics_move_after_requests(served: Served) -> None:
    lab = (("model_name", "falcon-test"),)
    before = served.metrics()
    served.client().completions.create(model="falcon-test", prompt=PROMPT, max_tokens=6, temperature=0)
    after = served.metrics()

    def delta(name: str) -> float:
        return after.get((name, lab), 0.0) - before.get((name, lab), 0.0)

    assert delta("spec_decode_num_drafts_total") >= 1
    assert delta("spec_decode_num_draft_tokens_total") == 2 * delta("spec_decode_num_drafts_total")  # chain-2
    assert 0 <= delta("spec_decode_num_accepted_tokens_total") <= delta("spec_decode_num_draft_tokens_total")
    assert delta("e2e_request_latency_seconds_count") == 1
    assert delta("time_to_first_token_seconds_count") == 1
    assert delta("generation_tokens_total") == 6
    assert 0 < delta("time_to_first_token_seconds_sum") <= delta("e2e_request_latency_seconds_sum")
    assert ("spec_decode_num_accepted_tokens_per_pos_total", (*lab, ("position", "0"))) in after
    assert delta("request_decode_tokens_per_second_count") == 1

    # Speculation turned off for one request: tokens move, the spec-decode counters do not.
    before = after
    served.client().completions.create(
        model="falcon-test", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"speculative": False}
    )
    after = served.metrics()
    assert delta("generation_tokens_total") == 6 and delta("e2e_request_latency_seconds_count") == 1
    assert delta("spec_decode_num_drafts_total") == delta("spec_decode_num_draft_tokens_total") == 0


def _error(status_body: tuple[int, bytes]) -> tuple[int, dict]:
    status, data = status_body
    body = json.loads(data)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return status, body["error"]


@pytest.mark.parametrize(
    ("path", "raw", "status", "code"),
    [
        ("/v1/completions", b'{"model": "plain-test", "prompt": ', 400, "invalid_json"),
        ("/v1/completions", b'{"model": "plain-test", "prompt": "caf\xe9"}', 400, "invalid_utf8"),
        ("/v1/completions", b'{"model": "plain-test", "prompt": "x", "max_tokens": "9"}', 400, "int_type"),
        ("/v1/chat/completions", b'{"model": "plain-test", "messages": "hi"}', 400, "list_type"),
        (
            "/v1/completions",
            b'{"model": "plain-test", "prompt": "x", "max_tokens": 5000}',
            400,
            "max_tokens_too_large",
        ),
        ("/v1/completions", b'{"model": "../../etc/passwd", "prompt": "x"}', 404, "model_not_found"),
        ("/v1/completions", b'{"model": "smollm2-135m-instruct", "prompt": "x"}', 404, "model_not_found"),
        ("/v1/completions", json.dumps({"model": "plain-test", "prompt": "a " * 9000}).encode(), 400, None),
        (
            "/v1/completions",
            json.dumps({"model": "plain-test", "prompt": "a" * MAX_BODY}).encode(),
            413,
            "request_too_large",
        ),
        ("/v1/completions", b'{"model": "plain-test", "prompt": [99999999]}', 400, None),
        ("/v1/nothing", b"{}", 404, None),
    ],
    ids=[
        "malformed-json",
        "invalid-utf8",
        "wrong-type",
        "wrong-type-messages",
        "max-tokens-over-limit",
        "model-as-path",
        "unconfigured-model",
        "prompt-over-context",
        "oversized-body",
        "bad-token-id",
        "unknown-route",
    ],
)
def test_bad_input_gives_openai_error_and_server_keeps_serving(
    served: Served, path: str, raw: bytes, status: int, code: str | None
) -> None:
    got, err = _error(served.raw("POST", path, raw))
    assert got == status, err
    if code is not None:
        assert err["code"] == code, err
    if "context" in err["message"]:
        assert "8192" in err["message"]
    ok = served.client().completions.create(model="plain-test", prompt="Hi", max_tokens=1, temperature=0)
    assert ok.usage.completion_tokens == 1


def test_prompt_over_context_message(served: Served) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        served.client().completions.create(model="plain-test", prompt="a " * 9000, max_tokens=1, stream=True)
    assert "context limit" in str(info.value)


def test_client_disconnect_mid_stream_frees_the_engine(served: Served) -> None:
    lab = (("model_name", "plain-test"),)
    body = json.dumps(
        {
            "model": "plain-test",
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
            "max_tokens": 1000,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    conn = http.client.HTTPConnection(served.host, served.port, timeout=120)
    conn.request(
        "POST",
        "/v1/completions",
        body=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:
        line = resp.fp.readline()
        assert line, "stream ended early"
        events += line.startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    deadline = time.monotonic() + 60
    while served.metrics().get(("num_requests_running", lab), 1.0) != 0.0:
        assert time.monotonic() < deadline, "the abandoned request is still running at the router"
        time.sleep(0.5)
    before = served.metrics()
    start = time.monotonic()
    served.client().completions.create(model="plain-test", prompt="Hi", max_tokens=2, temperature=0)
    after = served.metrics()
    key = ("request_queue_time_seconds_sum", lab)
    queued = after[key] - before.get(key, 0.0)
    # Had the engine kept decoding the abandoned 1000 tokens, this request would have queued behind them.
    assert queued < 5.0, f"queued {queued:.1f} s behind the abandoned request"
    assert time.monotonic() - start < 30


def _running_replicas(deployment: str) -> int:
    from bench.load_test import running_replicas

    return running_replicas("falcon", deployment)


def test_burst_scales_out_within_bounds(served: Served) -> None:
    """6 concurrent requests on a 1..2-replica deployment (2 ongoing per replica): they queue, the
    autoscaler adds the second replica, every request succeeds."""
    assert _running_replicas("engine-falcon-test") == 1
    results: list[object] = []

    def one(i: int) -> None:
        try:
            r = served.client().completions.create(
                model="falcon-test", prompt=f"Count from {i}:", max_tokens=24, temperature=0
            )
            results.append(r.usage.completion_tokens)
        except Exception as err:  # collected and asserted on below
            results.append(err)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    seen = [1]
    while any(w.is_alive() for w in workers):
        seen.append(_running_replicas("engine-falcon-test"))
        time.sleep(0.5)
    for w in workers:
        w.join()
    seen.append(_running_replicas("engine-falcon-test"))
    assert all(isinstance(r, int) and r > 0 for r in results), results
    assert max(seen) == 2, f"replica counts seen during the burst: {sorted(set(seen))}"
    assert min(seen) >= 1
    assert _running_replicas("engine-plain-test") == 1
