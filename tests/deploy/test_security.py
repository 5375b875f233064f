"""Authentication, the body limit, and model names that cannot reach the filesystem, on the real app.

Policy (deploy/router.py): with `api_key_env` naming a set variable, `/v1/models`, `/v1/completions` and
`/v1/chat/completions` need `Authorization: Bearer <key>` (scheme case-insensitive, key compared with
`hmac.compare_digest`); without it or with a wrong key they answer 401 in OpenAI's error shape, before
the body is read (so an unauthenticated client cannot make the server read a large body). `/health`
is open (load balancers and Kubernetes probes send no key) and so is `/metrics`, as in vLLM: Prometheus
scrapers send no key, and the page holds counters and latencies per model name, no prompts, texts or
keys (this file checks that); restrict it at the network level where even that matters. Bodies over
`max_body_bytes` get 413, whether declared by Content-Length or streamed chunked without one.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import SMALL_API_KEY, SMALL_MAX_BODY, SMALL_MODEL, SmallApp

pytestmark = pytest.mark.slow  # starts Ray and one engine replica (~20 s)

REPO = Path(__file__).resolve().parents[2]
COMPLETION = {"model": SMALL_MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
CHAT = {"model": SMALL_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", json.dumps(COMPLETION).encode()),
    ("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
]
BAD_AUTH = {
    "no-header": None,
    "empty": "",
    "wrong-key": "Bearer wrong-key",
    "key-prefix": f"Bearer {SMALL_API_KEY[:-1]}",
    "key-plus-one": f"Bearer {SMALL_API_KEY}x",
    "no-token": "Bearer",
    "basic-scheme": f"Basic {SMALL_API_KEY}",
    "no-scheme": SMALL_API_KEY,
    "token-scheme": f"Token {SMALL_API_KEY}",
    "long-garbage": "Bearer " + "k" * 6000,
    "latin1-bytes": "Bearer cl\xe9",
}


def _assert_401(reply) -> None:
    assert reply.status == 401, (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert SMALL_API_KEY not in reply.body.decode()


@pytest.mark.parametrize("auth", list(BAD_AUTH), ids=list(BAD_AUTH))
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
def test_protected_routes_refuse_a_missing_or_wrong_key(
    small_app: SmallApp, method: str, path: str, body: bytes | None, auth: str
) -> None:
    reply = small_app.request(method, path, body, headers={"Authorization": BAD_AUTH[auth]}, auth=False)
    _assert_401(reply)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
@pytest.mark.parametrize(
    "header", [f"Bearer {SMALL_API_KEY}", f"bearer {SMALL_API_KEY}", f"Bearer  {SMALL_API_KEY} "]
)
def test_protected_routes_answer_with_the_key(
    small_app: SmallApp, method: str, path: str, body: bytes | None, header: str
) -> None:
    reply = small_app.request(method, path, body, headers={"Authorization": header}, auth=False)
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["object"] in ("list", "text_completion", "chat.completion")


def test_the_key_in_a_query_string_is_not_accepted(small_app: SmallApp) -> None:
    reply = small_app.request("GET", f"/v1/models?api_key={SMALL_API_KEY}", auth=False)
    _assert_401(reply)


def test_health_and_metrics_are_open_and_metrics_leak_no_secrets(small_app: SmallApp) -> None:
    assert small_app.request("GET", "/health", auth=False).json() == {"status": "ok"}
    secret_prompt = "my-secret-prompt-7d1e"
    body = json.dumps({**COMPLETION, "prompt": secret_prompt}).encode()
    assert small_app.request("POST", "/v1/completions", body).status == 200
    metrics = small_app.request("GET", "/metrics", auth=False)
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    assert f'model_name="{SMALL_MODEL}"' in text  # the page is live
    assert secret_prompt not in text and SMALL_API_KEY not in text and "Bearer" not in text


def test_an_unauthenticated_large_body_is_refused_as_401_not_read(small_app: SmallApp) -> None:
    body = json.dumps({**COMPLETION, "user": "u" * (4 * SMALL_MAX_BODY)}).encode()
    _assert_401(small_app.request("POST", "/v1/completions", body, auth=False))


def _padded(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (JSON whitespace padding)."""
    core = json.dumps(COMPLETION).encode()
    return core[:-1] + b" " * (size - len(core)) + b"}"


def _chunked_request(body: bytes) -> bytes:
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Authorization: Bearer {SMALL_API_KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_body_limit_is_exact_with_and_without_content_length(small_app: SmallApp, transfer: str) -> None:
    for size, status in [(SMALL_MAX_BODY, 200), (SMALL_MAX_BODY + 1, 413), (8 * SMALL_MAX_BODY, 413)]:
        body = _padded(size)
        assert len(body) == size
        if transfer == "chunked":
            reply = small_app.send_raw(_chunked_request(body))
        else:
            reply = small_app.request("POST", "/v1/completions", body)
        assert reply.status == status, (size, reply.status, reply.body[:300])
        if status == 413:
            assert reply.json()["error"]["code"] == "request_too_large"
    assert small_app.completion_works()


def test_a_model_path_in_a_request_opens_nothing_on_disk(
    small_app: SmallApp, smollm2_path: Path, tmp_path: Path
) -> None:
    """A loadable model folder named in "model" is refused (404) and none of its files is even read.

    Reads are seen through access times: each file's atime is set far in the past, which `relatime`
    updates on the next read (checked first on a control file)."""
    folder = tmp_path / "model-folder"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (smollm2_path / name).is_file():
            shutil.copy(smollm2_path / name, folder / name)
    (folder / "model.safetensors").symlink_to(smollm2_path / "model.safetensors")
    files = [folder / "config.json", folder / "tokenizer.json"]

    def age(paths: list[Path]) -> dict[Path, float]:
        for p in paths:
            os.utime(p, (1_000_000, p.stat().st_mtime))
        return {p: p.stat().st_atime for p in paths}

    control = tmp_path / "control.json"
    control.write_text("{}")
    before = age([control])
    control.read_text()
    if control.stat().st_atime == before[control]:
        pytest.skip("this filesystem does not update access times on read")

    before = age(files)
    for name in (str(folder), str(folder / "config.json"), f"file://{folder}", str(folder) + "/"):
        for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            reply = small_app.request("POST", path, json.dumps({**base, "model": name}).encode())
            assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found", reply.body
    time.sleep(0.2)
    after = {p: p.stat().st_atime for p in files}
    assert after == before, "a file of the model folder named in a request was read by the server"


# ---------------------------------------------------------------------------------------------------
# Code inspection: the request's "model" only ever meets the configured table


def _tree(path: str) -> ast.Module:
    return ast.parse((REPO / path).read_text())


def test_request_model_names_never_reach_a_loader() -> None:
    router = _tree("deploy/router.py")
    names = {n.id for n in ast.walk(router) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(router) if isinstance(n, ast.Attribute)}
    loaders = {"resolve_model", "from_pretrained", "load_target", "load_drafter", "open", "Path"}
    assert not (names | attrs) & loaders, (names | attrs) & loaders
    # Every use of a request's `.model` is the argument of `self._model(...)` (the config lookup).
    uses = [n for n in ast.walk(router) if isinstance(n, ast.Attribute) and n.attr == "model"]
    request_uses = [n for n in uses if isinstance(n.value, ast.Name) and n.value.id == "req"]
    lookups = [
        c.args[0]
        for c in ast.walk(router)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "_model"
    ]
    assert request_uses and all(any(u is a for a in lookups) for u in request_uses)
    model_fn = next(f for f in ast.walk(router) if isinstance(f, ast.FunctionDef) and f.name == "_model")
    assert "self.config.model(name)" in ast.unparse(model_fn)
    # The engine loads only what its ModelConfig (the operator's config) says.
    engine = _tree("deploy/engine.py")
    calls = [
        c
        for c in ast.walk(engine)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "from_pretrained"
    ]
    assert len(calls) == 1
    kwargs = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    assert kwargs["model"] == "model.target_spec()" and kwargs["drafter"] == "model.drafter_path()"
    init = next(f for f in ast.walk(engine) if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assert [ast.unparse(a.annotation) for a in init.args.args if a.arg == "model"] == ["ModelConfig"]


def test_the_key_is_compared_in_constant_time() -> None:
    router = _tree("deploy/router.py")
    authorize = next(f for f in ast.walk(router) if isinstance(f, ast.FunctionDef) and f.name == "_authorize")
    source = ast.unparse(authorize)
    assert "hmac.compare_digest" in source and "==" not in source
