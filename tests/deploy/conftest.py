"""Fixtures shared by the tests that run the real Serve application on a local Ray (127.0.0.1):
`free_port`, `local_serve` (start Ray + Serve with a config dict, shut both down after), and
`tiny_serving_model` (a random fp32 Llama folder with SmolLM2's tokenizer, fast enough for load tests);
`small_app` (the router and one SmolLM2 replica with an API key and a 64 KiB body limit) with raw-HTTP
helpers, for the bad-input and security tests."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PORT_RANGE = (20000, 32768)
"""Ports for the test servers: below Linux's ephemeral range (32768-60999), where Ray's own processes and
every client socket take their ports, and above Ray's worker ports (10002-19999). A port the kernel hands
out as ephemeral (bind to 0) can be taken by a Ray process starting between the pick and Serve's bind."""


def pick_free_port() -> int:
    """A TCP port in `PORT_RANGE` free on 127.0.0.1 now."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE} after 200 tries")


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """`free_port() -> int`: a TCP port free on 127.0.0.1 now (see `PORT_RANGE`)."""
    return pick_free_port


@contextlib.contextmanager
def _local_serve(config: dict[str, Any], env: dict[str, str], num_cpus: int) -> Iterator[None]:
    import ray
    from ray import serve

    from deploy.cli import deploy, load_config, start_ray

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        if ray.is_initialized():
            ray.shutdown()
        start_ray(None, num_cpus=num_cpus)
        try:
            deploy(load_config(config))
            yield
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="session")
def local_serve() -> Callable[..., contextlib.AbstractContextManager[None]]:
    """`with local_serve(config, env={}, num_cpus=4):` a local Ray on loopback running the Serve config
    dict (`serve.run` returns once the applications are up), with `env` set for Ray's processes."""

    def start(
        config: dict[str, Any], env: dict[str, str] | None = None, num_cpus: int = 4
    ) -> contextlib.AbstractContextManager[None]:
        return _local_serve(config, env or {}, num_cpus)

    return start


@pytest.fixture(scope="session")
def tiny_serving_model(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A HF folder: random 2-layer Llama (hidden 64, context 4096) over SmolLM2's vocabulary, with its
    tokenizer (chat template, EOS); sharp logits so greedy paths are not near-ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    folder = tmp_path_factory.mktemp("serving") / "tiny-llama"
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# `small_app`: the real router + one SmolLM2 replica, for the bad-input and security tests

SMALL_API_KEY_ENV = "FALCON_SMALL_TEST_API_KEY"
SMALL_API_KEY = "small-key-4f1c"
SMALL_MAX_BODY = 64 * 1024
SMALL_MODEL = "plain-test"


@dataclasses.dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> HttpReply:
    """The first final HTTP/1.1 response in `raw` (interim 1xx ones skipped; Content-Length or chunked
    body); status 0 if there is none."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    while sep and head.startswith(b"HTTP/1.1 1"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
    if not sep:
        return HttpReply(0, {}, raw)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    status = int(lines[0].split()[1])
    if "content-length" in headers:
        return HttpReply(status, headers, rest[: int(headers["content-length"])])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return HttpReply(status, headers, bytes(body))
    return HttpReply(status, headers, rest)


@dataclasses.dataclass(frozen=True)
class SmallApp:
    host: str
    port: int

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str | None] | None = None,
        auth: bool = True,
        timeout: float = 120,
    ) -> HttpReply:
        """One request through `http.client`: JSON content type and the key unless overridden (a header
        given as None is left out)."""
        hdrs: dict[str, str | None] = {"Content-Type": "application/json"}
        if auth:
            hdrs["Authorization"] = f"Bearer {SMALL_API_KEY}"
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={k: v for k, v in hdrs.items() if v is not None})
            resp = conn.getresponse()
            return HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def send_raw(self, data: bytes, timeout: float = 60) -> HttpReply:
        """Write `data` (a whole HTTP/1.1 request, possibly malformed) on a fresh socket; read until the
        server closes (send `Connection: close`) and parse the first response."""
        chunks = []
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused mid-body
                sock.sendall(data)
            while True:
                try:
                    part = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not part:
                    break
                chunks.append(part)
        return parse_response(b"".join(chunks))

    def completion_works(self) -> bool:
        body = {"model": SMALL_MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        reply = self.request("POST", "/v1/completions", json.dumps(body).encode())
        return reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 1


def small_app_config(port: int) -> dict[str, Any]:
    model = {
        "name": SMALL_MODEL,
        "dtype": "bf16",
        "torch_threads": 1,
        "num_cpus": 0.5,
        "max_tokens_limit": 64,
        "default_max_tokens": 4,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    args = {"api_key_env": SMALL_API_KEY_ENV, "max_body_bytes": SMALL_MAX_BODY, "models": [model]}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": "falcon", "route_prefix": "/", "import_path": "deploy.router:build_app", "args": args}
        ],
    }


@pytest.fixture(scope="module")
def small_app(free_port: Callable[[], int]) -> Iterator[SmallApp]:
    """The real app (router + one bf16 SmolLM2 replica, key `SMALL_API_KEY`, body limit 64 KiB) on a
    local Ray; each module that uses it starts its own (~20 s)."""
    port = free_port()
    with _local_serve(small_app_config(port), {SMALL_API_KEY_ENV: SMALL_API_KEY}, num_cpus=2):
        yield SmallApp("127.0.0.1", port)
