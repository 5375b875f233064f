"""Malformed HTTP requests against the real Serve app (local Ray on 127.0.0.1), over raw sockets.

Every case is a whole HTTP/1.1 request written byte for byte, so nothing a client library would refuse
to send is out of reach: bodies over the limit, invalid UTF-8, JSON nested 30,000 deep, NaN and
Infinity, integers of 5,000 digits, wrong types for every field, a model named by a filesystem path,
wrong content types, garbage or conflicting Content-Length, chunked bodies. Each must get a 4xx with
OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`), never a 5xx, and the server
must stay healthy afterwards (`/health` and a real completion).

Requests the HTTP parser itself (uvicorn + httptools inside Serve's proxy) refuses before any
application code runs (a Content-Length that is not a number, two different Content-Lengths, both
Content-Length and chunked, a broken chunk, a request line of garbage) get uvicorn's plain-text
`400 Bad Request`: those cases (`PARSER`) check the 400 and the closed connection only.

Policy choices, as OpenAI's own API makes them (vLLM instead ignores unknown fields with a warning):
unknown fields are a 400 (`extra_forbidden`), and so are wrong types (`"max_tokens": "5"` is not coerced).
A `Content-Type` other than `application/json` is a 415 (a browser can POST `text/plain` or a form
cross-origin without a CORS preflight; refusing them keeps a key-less local server out of reach of
web pages); a request without `Content-Type` is read as JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.deploy.conftest import SMALL_API_KEY, SMALL_MAX_BODY, SMALL_MODEL, SmallApp, parse_response

pytestmark = pytest.mark.slow  # starts Ray and one engine replica (~20 s), then ~150 requests

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
NAMES = {COMPLETIONS: "completions", CHAT: "chat"}
BASE: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": SMALL_MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0},
    CHAT: {"model": SMALL_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}
AUTH = f"Bearer {SMALL_API_KEY}"
MISSING = object()


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    """The whole request, as written to the socket."""
    status: int
    code: str | None = None
    """The expected `error.code`, where the case pins one."""
    parser: bool = False
    """Refused by the HTTP parser (uvicorn's plain-text 400) before the application sees it."""


def http(
    path: str,
    body: bytes,
    *,
    method: str = "POST",
    content_type: str | None = "application/json",
    length: str | None = "auto",
    extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> bytes:
    """A request with the key, `Connection: close`, and the given body / Content-Type / Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: {AUTH}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length == "auto":
        lines.append(f"Content-Length: {len(body)}")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 4096) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def with_field(path: str, key: str, value: Any) -> bytes:
    """The endpoint's valid body with `key` set to `value` (or removed, for MISSING)."""
    body = dict(BASE[path])
    if value is MISSING:
        body.pop(key, None)
    else:
        body[key] = value
    return json.dumps(body).encode()


def with_raw_field(path: str, key: str, literal: str) -> bytes:
    """The valid body with `key` set to a JSON literal Python would not write (NaN, 1e999, 5000 digits)."""
    body = {k: v for k, v in BASE[path].items() if k != key}
    return json.dumps(body)[:-1].encode() + f', "{key}": {literal}}}'.encode()


# Wrong values for the fields both endpoints share: (field, label, value or raw literal, status, code).
HUGE = "9" * 5000  # more digits than Python's int parser accepts by default (4300)
SHARED_FIELDS: list[tuple[str, str, Any, int, str | None]] = [
    ("max_tokens", "zero", 0, 400, "greater_than_equal"),
    ("max_tokens", "negative", -1, 400, "greater_than_equal"),
    ("max_tokens", "float", 1.5, 400, "int_type"),
    ("max_tokens", "string", "5", 400, "int_type"),
    ("max_tokens", "bool", True, 400, "int_type"),
    ("max_tokens", "over-limit", 10**6, 400, "max_tokens_too_large"),
    ("max_tokens", "2^64", 2**64, 400, "max_tokens_too_large"),
    ("max_tokens", "nan", "raw:NaN", 400, "int_type"),
    ("max_tokens", "infinity", "raw:Infinity", 400, "int_type"),
    ("max_tokens", "1e999", "raw:1e999", 400, "int_type"),
    ("max_tokens", "5000-digits", f"raw:{HUGE}", 400, "invalid_json"),
    ("max_tokens", "list", [2], 400, "int_type"),
    ("temperature", "negative", -0.5, 400, "greater_than_equal"),
    ("temperature", "too-high", 2.5, 400, "less_than_equal"),
    ("temperature", "string", "0.5", 400, "float_type"),
    ("temperature", "bool", True, 400, "float_type"),
    ("temperature", "nan", "raw:NaN", 400, None),
    ("temperature", "infinity", "raw:Infinity", 400, None),
    ("temperature", "-infinity", "raw:-Infinity", 400, None),
    ("temperature", "1e999", "raw:1e999", 400, None),
    ("top_p", "zero", 0, 400, "greater_than"),
    ("top_p", "negative", -1, 400, "greater_than"),
    ("top_p", "too-high", 1.5, 400, "less_than_equal"),
    ("top_p", "nan", "raw:NaN", 400, None),
    ("top_p", "infinity", "raw:Infinity", 400, None),
    ("top_p", "string", "1", 400, "float_type"),
    ("top_k", "negative", -2, 400, "greater_than_equal"),
    ("top_k", "float", 1.5, 400, "int_type"),
    ("top_k", "nan", "raw:NaN", 400, "int_type"),
    ("top_k", "2^64", 2**64, 400, "less_than_equal"),
    ("top_k", "string", "5", 400, "int_type"),
    ("n", "zero", 0, 400, "literal_error"),
    ("n", "two", 2, 400, "literal_error"),
    ("n", "negative", -1, 400, "literal_error"),
    ("n", "huge", 10**30, 400, None),
    ("n", "nan", "raw:NaN", 400, "literal_error"),
    ("n", "infinity", "raw:Infinity", 400, "literal_error"),
    ("seed", "2^64", 2**64, 400, "less_than_equal"),
    ("seed", "-2^63-1", -(2**63) - 1, 400, "greater_than_equal"),
    ("seed", "float", 0.5, 400, "int_type"),
    ("seed", "string", "7", 400, "int_type"),
    ("stream", "string", "true", 400, "bool_type"),
    ("stream", "int", 1, 400, "bool_type"),
    ("stream_options", "string", "usage", 400, "model_type"),
    ("stream_options", "wrong-type-inside", {"include_usage": "yes"}, 400, "bool_type"),
    ("stream_options", "unknown-inside", {"usage": True}, 400, "extra_forbidden"),
    ("stop", "five-strings", ["a", "b", "c", "d", "e"], 400, None),
    ("stop", "int-list", [1], 400, None),
    ("stop", "empty-string", "", 400, None),
    ("stop", "object", {"a": 1}, 400, None),
    ("presence_penalty", "unsupported", 0.5, 400, "literal_error"),
    ("logit_bias", "unknown-field", {"50256": -100}, 400, "extra_forbidden"),
    ("__proto__", "unknown-field", {"polluted": True}, 400, "extra_forbidden"),
    ("model", "int", 123, 400, "string_type"),
    ("model", "null", None, 400, "string_type"),
    ("model", "missing", MISSING, 400, "missing"),
    ("model", "empty", "", 404, "model_not_found"),
    ("model", "dotdot-path", "../../etc/passwd", 404, "model_not_found"),
    ("model", "absolute-path", "/tmp/x", 404, "model_not_found"),
    ("model", "home-path", "~/.ssh/id_rsa", 404, "model_not_found"),
    ("model", "file-url", "file:///etc/passwd", 404, "model_not_found"),
    ("model", "hub-alias", "smollm2-135m-instruct", 404, "model_not_found"),
    ("model", "hub-id", "HuggingFaceTB/SmolLM2-135M-Instruct", 404, "model_not_found"),
    ("model", "served-name-with-path", f"{SMALL_MODEL}/../{SMALL_MODEL}", 404, "model_not_found"),
    ("model", "wrong-case", SMALL_MODEL.upper(), 404, "model_not_found"),
    ("model", "very-long", "m" * 20000, 404, "model_not_found"),
]

COMPLETION_FIELDS: list[tuple[str, str, Any, int, str | None]] = [
    ("prompt", "missing", MISSING, 400, "missing"),
    ("prompt", "null", None, 400, None),
    ("prompt", "int", 123, 400, None),
    ("prompt", "object", {"text": "Hi"}, 400, None),
    ("prompt", "empty-string", "", 400, None),
    ("prompt", "empty-list", [], 400, None),
    ("prompt", "batch-of-two", ["a", "b"], 400, None),
    ("prompt", "negative-token", [-1], 400, None),
    ("prompt", "token-2^40", [2**40], 400, None),
    ("prompt", "float-token", [1.5], 400, None),
    ("prompt", "bool-token", [True], 400, None),
    ("prompt", "nested-empty", [[]], 400, None),
    ("prompt", "lone-surrogate", 'raw:"\\ud800 hi"', 400, None),
    ("echo", "unsupported", True, 400, "literal_error"),
    ("best_of", "two", 2, 400, "literal_error"),
]

CHAT_FIELDS: list[tuple[str, str, Any, int, str | None]] = [
    ("messages", "missing", MISSING, 400, "missing"),
    ("messages", "empty", [], 400, "too_short"),
    ("messages", "string", "hi", 400, "list_type"),
    ("messages", "list-of-strings", ["hi"], 400, "model_type"),
    ("messages", "empty-object", [{}], 400, "missing"),
    ("messages", "bad-role", [{"role": "root", "content": "x"}], 400, "literal_error"),
    ("messages", "tool-role", [{"role": "tool", "content": "x"}], 400, "literal_error"),
    ("messages", "missing-content", [{"role": "user"}], 400, "missing"),
    ("messages", "null-content", [{"role": "user", "content": None}], 400, None),
    ("messages", "int-content", [{"role": "user", "content": 5}], 400, None),
    (
        "messages",
        "image-part",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        400,
        None,
    ),
    ("messages", "unknown-key", [{"role": "user", "content": "x", "extra": 1}], 400, "extra_forbidden"),
    ("messages", "lone-surrogate", 'raw:[{"role": "user", "content": "\\udfff"}]', 400, None),
    ("max_completion_tokens", "with-max-tokens", 3, 400, None),
    ("logprobs", "true", True, 400, "literal_error"),
]


def _field_cases() -> list[Case]:
    cases = []
    table = [(p, f) for p in (COMPLETIONS, CHAT) for f in SHARED_FIELDS]
    table += [(COMPLETIONS, f) for f in COMPLETION_FIELDS] + [(CHAT, f) for f in CHAT_FIELDS]
    for path, (key, label, value, status, code) in table:
        if isinstance(value, str) and value.startswith("raw:"):
            body = with_raw_field(path, key, value.removeprefix("raw:"))
        else:
            body = with_field(path, key, value)
        cases.append(Case(f"{NAMES[path]}-{key}-{label}", http(path, body), status, code))
    return cases


def _body_cases(path: str) -> list[Case]:
    name = NAMES[path]
    valid = json.dumps(BASE[path]).encode()
    over = json.dumps({**BASE[path], "user": "u" * SMALL_MAX_BODY}).encode()
    nested = b"[" * 30000 + b"]" * 30000
    nested_field = valid[:-1] + b', "user": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    bodies: list[tuple[str, bytes, int, str | None]] = [
        ("not-json", b"hello", 400, "invalid_json"),
        ("empty-body", b"", 400, "invalid_json"),
        ("json-null", b"null", 400, "invalid_json"),
        ("json-array", b"[]", 400, "invalid_json"),
        ("json-number", b"42", 400, "invalid_json"),
        ("json-string", b'"hi"', 400, "invalid_json"),
        ("xml", b"<request><model>x</model></request>", 400, "invalid_json"),
        ("truncated", valid[:-5], 400, "invalid_json"),
        ("trailing-garbage", valid + b"}}", 400, "invalid_json"),
        ("nested-30000", nested, 400, "invalid_json"),
        ("nested-in-field", nested_field, 400, "invalid_json"),
        ("invalid-utf8-ff", valid[:-1] + b', "user": "\xff\xfe"}', 400, "invalid_utf8"),
        ("invalid-utf8-overlong", valid[:-1] + b', "user": "\xc0\xaf"}', 400, "invalid_utf8"),
        ("invalid-utf8-surrogate-bytes", valid[:-1] + b', "user": "\xed\xa0\x80"}', 400, "invalid_utf8"),
        ("utf16-json", valid.decode().encode("utf-16"), 400, "invalid_utf8"),
        ("utf8-bom", b"\xef\xbb\xbf" + valid, 400, "invalid_json"),
        ("over-limit", over, 413, "request_too_large"),
    ]
    cases = [
        Case(f"{name}-body-{label}", http(path, body), status, code) for label, body, status, code in bodies
    ]
    te = [("Transfer-Encoding", "chunked")]
    media, big = "unsupported_media_type", "request_too_large"
    cases += [
        Case(f"{name}-ctype-text-plain", http(path, valid, content_type="text/plain"), 415, media),
        Case(
            f"{name}-ctype-form",
            http(path, b"model=x", content_type="application/x-www-form-urlencoded"),
            415,
            media,
        ),
        Case(
            f"{name}-ctype-multipart",
            http(path, valid, content_type="multipart/form-data; boundary=x"),
            415,
            media,
        ),
        Case(f"{name}-declared-huge-length", http(path, valid, length=str(10**9)), 413, big),
        Case(f"{name}-chunked-over-limit", http(path, chunked(over), length=None, extra=te), 413, big),
        Case(
            f"{name}-chunked-not-json",
            http(path, chunked(b"hello"), length=None, extra=te),
            400,
            "invalid_json",
        ),
        Case(
            f"{name}-expect-100-over-limit",
            http(path, b"", length=str(10 * SMALL_MAX_BODY), extra=[("Expect", "100-continue")]),
            413,
            big,
        ),
        Case(
            f"{name}-gzip-encoded-garbage",
            http(path, b"\x1f\x8b\x08\x00garbage", extra=[("Content-Encoding", "gzip")]),
            400,
            "invalid_utf8",
        ),
        Case(f"{name}-get-method", http(path, b"", method="GET", length=None), 405),
        Case(f"{name}-put-method", http(path, valid, method="PUT"), 405),
    ]
    parser_refused = {
        "length-garbage": http(path, valid, length="abc"),
        "length-20-digits": http(path, valid, length="9" * 20),
        "ctype-control-bytes": http(path, valid, content_type="\x01\x02"),
        "length-negative": http(path, valid, length="-1"),
        "length-duplicate": http(path, valid, extra=[("Content-Length", str(len(valid) + 7))]),
        "length-and-chunked": http(path, chunked(valid), extra=te),
        "chunk-size-garbage": http(path, b"zz\r\n" + valid + b"\r\n0\r\n\r\n", length=None, extra=te),
        "header-without-colon": http(path, valid, extra=[("X-A", "1\r\nthis line has no colon")]),
    }
    cases += [Case(f"{name}-{label}", raw, 400, parser=True) for label, raw in parser_refused.items()]
    return cases


CASES = _field_cases() + _body_cases(COMPLETIONS) + _body_cases(CHAT)
CASES.append(Case("garbage-request-line", b"GARBAGE\r\n\r\n", 400, parser=True))
CASES.append(Case("unknown-route", http("/v1/../../etc/passwd", b"{}"), 404))


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_request_gets_a_4xx_openai_error(small_app: SmallApp, case: Case) -> None:
    start = time.monotonic()
    reply = small_app.send_raw(case.raw)
    assert time.monotonic() - start < 30, "the server took over 30 s to refuse a malformed request"
    assert reply.status == case.status, (reply.status, reply.body[:500])
    if case.parser:
        return
    body = reply.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error"), error
    if case.code is not None:
        assert error["code"] == case.code, error
    assert reply.headers.get("content-type", "").startswith("application/json")


def test_model_named_by_a_real_model_folder_is_refused(small_app: SmallApp, smollm2_path) -> None:
    """The path of a loadable model folder (the very target the replica serves) is still only a name
    that is not configured: 404, no generation."""
    for name in (str(smollm2_path), str(smollm2_path / "config.json")):
        body = json.dumps({**BASE[COMPLETIONS], "model": name}).encode()
        reply = small_app.send_raw(http(COMPLETIONS, body))
        assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_an_unfinished_body_does_not_block_other_requests(small_app: SmallApp) -> None:
    """A client that declares 1000 bytes and sends 10 holds only its own connection."""
    import socket

    with socket.create_connection((small_app.host, small_app.port), timeout=30) as stalled:
        stalled.sendall(http(COMPLETIONS, b'{"model": ', length="1000"))
        time.sleep(0.5)
        start = time.monotonic()
        assert small_app.request("GET", "/health").status == 200
        assert small_app.completion_works()
        assert time.monotonic() - start < 30


def test_server_is_healthy_after_the_malformed_requests(small_app: SmallApp) -> None:
    from ray import serve

    assert small_app.request("GET", "/health", auth=False).status == 200
    assert small_app.completion_works()
    chat = small_app.request("POST", CHAT, json.dumps(BASE[CHAT]).encode())
    assert chat.status == 200 and chat.json()["choices"][0]["finish_reason"] in ("stop", "length")
    app = serve.status().applications["falcon"]
    assert str(getattr(app.status, "value", app.status)) == "RUNNING"
    for name, deployment in app.deployments.items():
        assert str(getattr(deployment.status, "value", deployment.status)) == "HEALTHY", name


def test_parse_response_reads_chunked_bodies() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert parse_response(raw).body == b"abcde"
