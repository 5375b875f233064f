"""Ray Data stages of hidden-state caching (driven by `pipelines/cache_hidden_states.py`).

Row contracts, stage by stage:
1. `ConversationDatasource`: one read task per input file (ShareGPT JSON, JSONL, Parquet; local or
   `s3://`), streamed by `falcon_core.data`. Rows: `kind` ("record"), `file` (position in the sorted
   input list), `index` (position among the file's parsed records), `id`, `messages` (JSON list of
   `{role, content}`). Each file ends with one row of `kind` "read_stats" whose `read_stats` column holds
   the JSON of what the read skipped or repaired, with reasons and places.
2. `RenderStage` (CPU): renders a record with the chat template and tokenizes it (`falcon_core.chat`),
   truncated to `max_seq_len`; adds `input_ids` list<int32>, `loss_mask` list<uint8>, `tokens`,
   `digest` and `skip` (why the record cannot be cached, "" when it can).
3. `ShardStage` (actor pool, one model per actor): one row per shard to write, naming where its
   records lie in the materialized output of stage 2; it optionally regenerates the assistant answers
   with the target (`Regenerator`), runs the target over the records in length-sorted padded batches
   (`TargetForward`), writes the shard (`pipelines.hidden_cache.write_shard`) and returns one row
   describing it. How records are batched depends only on the shard's content, so a shard's bytes
   do not depend on which actor or which run made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from falcon_core import chat
from falcon_core.data import ReadStats, iter_conversations
from pipelines.hidden_cache import CACHE_DTYPES, CachedRecord, CacheDtype, ShardData, shard_name, write_shard

READ_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("file", pa.int32()),
        ("index", pa.int64()),
        ("id", pa.string()),
        ("messages", pa.large_string()),
        ("read_stats", pa.string()),
    ]
)
SKIP_NO_ASSISTANT = "no assistant tokens within max_seq_len"
SKIP_TEMPLATE = "chat template cannot render it"


# ---------------------------------------------------------------------------------------------------
# 1. Read


class ConversationDatasource(Datasource):
    """Conversations of the given files, one read task per file, at most `max_records` per file."""

    def __init__(self, urls: Sequence[str], max_records: int | None = None, block_records: int = 256):
        super().__init__()
        self.urls = list(urls)
        self.max_records = max_records
        self.block_records = block_records

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                partial(_read_file, i, url, self.max_records, self.block_records),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[url]),
                schema=READ_SCHEMA,
            )
            for i, url in enumerate(self.urls)
        ]


def _read_file(file: int, url: str, max_records: int | None, block_records: int) -> Iterator[pa.Table]:
    stats = ReadStats(source=url)
    rows: list[dict[str, Any]] = []
    for conversation in iter_conversations(url, stats):
        messages = json.dumps(conversation.as_dicts(), ensure_ascii=False)
        rows.append(_row("record", file, stats.parsed - 1, conversation.id, messages))
        if len(rows) >= block_records:
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
            rows = []
        if max_records is not None and stats.parsed >= max_records:
            break
    name = url.rstrip("/").rsplit("/", 1)[-1]
    counts = {
        "skipped": dict(stats.skipped),
        "fixed": dict(stats.fixed),
        "problems": [f"{name}: {p}" for p in stats.problems],
    }
    rows.append(_row("read_stats", file, -1, "", "", json.dumps(counts)))
    yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _row(kind: str, file: int, index: int, id_: str, messages: str, read_stats: str = "") -> dict[str, Any]:
    return {
        "kind": kind,
        "file": file,
        "index": index,
        "id": id_,
        "messages": messages,
        "read_stats": read_stats,
    }


# ---------------------------------------------------------------------------------------------------
# 2. Render


@dataclass(frozen=True)
class RenderedRecord:
    input_ids: np.ndarray
    """(T,) int32"""
    loss_mask: np.ndarray
    """(T,) uint8"""
    skip: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.input_ids.tobytes() + self.loss_mask.tobytes()).hexdigest()


def render_record(tokenizer: Any, messages: Sequence[dict[str, str]], max_seq_len: int) -> RenderedRecord:
    """Chat-template rendering truncated to `max_seq_len` tokens; `skip` says why it is unusable."""
    empty_ids, empty_mask = np.zeros(0, np.int32), np.zeros(0, np.uint8)
    try:
        rendered = chat.render(tokenizer, messages)
    except ValueError:
        return RenderedRecord(empty_ids, empty_mask, SKIP_TEMPLATE)
    ids = np.asarray(rendered.input_ids[:max_seq_len], dtype=np.int32)  # (T,)
    mask = np.asarray(rendered.loss_mask[:max_seq_len], dtype=np.uint8)  # (T,)
    if not mask.any():
        return RenderedRecord(empty_ids, empty_mask, SKIP_NO_ASSISTANT)
    return RenderedRecord(ids, mask)


class RenderStage:
    """Ray Data callable: record rows -> rendered, tokenized, truncated rows (pyarrow in and out)."""

    def __init__(self, model_path: str, max_seq_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_seq_len = max_seq_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        rendered = []
        for kind, messages in zip(batch["kind"].to_pylist(), batch["messages"].to_pylist(), strict=True):
            if kind != "record":
                rendered.append(RenderedRecord(np.zeros(0, np.int32), np.zeros(0, np.uint8), "not a record"))
                continue
            rendered.append(render_record(self.tokenizer, json.loads(messages), self.max_seq_len))
        lengths = np.array([0] + [r.input_ids.shape[0] for r in rendered], dtype=np.int32)
        offsets = pa.array(np.cumsum(lengths, dtype=np.int32))
        ids = np.concatenate([r.input_ids for r in rendered])
        mask = np.concatenate([r.loss_mask for r in rendered])
        return (
            batch.append_column("input_ids", pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())))
            .append_column("loss_mask", pa.ListArray.from_arrays(offsets, pa.array(mask, pa.uint8())))
            .append_column("tokens", pa.array(lengths[1:].astype(np.int64)))
            .append_column("digest", pa.array([r.digest if not r.skip else "" for r in rendered]))
            .append_column("skip", pa.array([r.skip for r in rendered]))
        )


FACT_COLUMNS = ["kind", "file", "index", "tokens", "digest", "skip", "read_stats"]


def block_facts(block: pa.Table) -> list[dict[str, Any]]:
    """The planning columns of one materialized block of stage 2, one dict per row, in row order."""
    return block.select(FACT_COLUMNS).to_pylist()


# ---------------------------------------------------------------------------------------------------
# 3. Target


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Record positions grouped into forward batches, longest first: at most `batch_size` records and
    `batch_tokens` padded tokens (B x longest) each. Deterministic: ties go by position."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (
            len(current) >= batch_size or (len(current) + 1) * lengths[current[0]] > batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class TargetForward:
    """The frozen target's last-layer hidden states (and optional top-N log-probabilities) per record.

    Records are right-padded into length-sorted batches; under the default causal mask padding never
    reaches a real position, and the LM head runs only when top-N log-probabilities are asked for.
    """

    def __init__(
        self, target: Any, dtype: CacheDtype, topk: int = 0, batch_size: int = 8, batch_tokens: int = 16384
    ) -> None:
        self.target = target
        self.dtype = CACHE_DTYPES[dtype]
        self.topk = topk
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.device = target.embed.weight.device
        self._no_logits = torch.empty(0, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def __call__(self, records: Sequence[RenderedRecord]) -> list[CachedRecord]:
        lengths = [r.input_ids.shape[0] for r in records]
        out: list[CachedRecord | None] = [None] * len(records)
        for batch in length_batches(lengths, self.batch_size, self.batch_tokens):
            B, T = len(batch), lengths[batch[0]]
            ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.from_numpy(records[i].input_ids.astype(np.int64))
            ids = ids.to(self.device)
            positions = torch.arange(T, device=self.device).expand(B, T)  # (B, T)
            hidden = self.target(ids, positions, logits_index=self._no_logits).hidden  # (B, T, H)
            for row, i in enumerate(batch):
                h = hidden[row, : lengths[i]]  # (T_i, H)
                topk_ids, topk_logprobs = self._topk(h) if self.topk else (None, None)
                out[i] = CachedRecord(
                    input_ids=torch.from_numpy(records[i].input_ids.copy()),  # (T_i,)
                    loss_mask=torch.from_numpy(records[i].loss_mask.copy()),  # (T_i,)
                    hidden=h.to(self.dtype).cpu().clone(),  # (T_i, H)
                    topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs,
                )
        return [r for r in out if r is not None]

    def _topk(self, hidden: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (T, H) -> top-N ids (T, N) int32 and log-probabilities (T, N) float16."""
        ids, logprobs = [], []
        for a in range(0, hidden.shape[0], chunk):
            logits = self.target.lm_head(hidden[a : a + chunk]).float()  # (t, V)
            values, indices = logits.log_softmax(-1).topk(self.topk, dim=-1)  # (t, N) x 2
            ids.append(indices.to(torch.int32).cpu())
            logprobs.append(values.to(torch.float16).cpu())
        return torch.cat(ids), torch.cat(logprobs)  # (T, N) x 2


@dataclass(frozen=True)
class RegenerateSettings:
    """How assistant answers are regenerated: greedy at temperature 0, else sampled with `seed`."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 1
    """Greedy only: conversations decoded together (`falcon_core.batch_greedy`); 1 = one at a time."""
    max_answers: int | None = None
    """Keep each conversation up to its N-th regenerated answer, dropping later turns (None: all)."""

    def __post_init__(self) -> None:
        if self.max_answers is not None and self.max_answers <= 0:
            raise ValueError(f"regeneration max_answers must be positive or None, got {self.max_answers}")
        if self.max_new_tokens <= 0 or self.temperature < 0 or self.batch_size <= 0:
            raise ValueError(
                f"regeneration needs max_new_tokens > 0, temperature >= 0 and batch_size > 0, got "
                f"{self.max_new_tokens}, {self.temperature}, {self.batch_size}"
            )


class Regenerator:
    """Replaces a conversation's assistant answers by the target's own (self-distillation data).

    Turn by turn, each assistant message is regenerated from the conversation so far (with the earlier
    answers already replaced), by the plain decoder `falcon_core.generate.Engine`, one conversation at
    a time. The seed of each turn is derived from (seed, record number, turn), so a record's answers do
    not depend on which actor or batch it lands in. Turns that would start past `max_seq_len` are
    dropped (caching would truncate them away).

    Greedy with `batch_size > 1` (`many`): consecutive groups of `batch_size` conversations (in the
    order given: a shard's records in record order, so the groups depend only on the shard) are decoded
    together by `falcon_core.batch_greedy`, round by round (round r regenerates every conversation's
    r-th answer). Several times the throughput on a CPU; batched bf16 matmuls round differently from
    batch 1, so answers may part from `Engine`'s at near-ties (fp32: equal, tested).
    """

    def __init__(self, engine: Any, settings: RegenerateSettings, max_seq_len: int) -> None:
        self.engine = engine
        self.settings = settings
        self.max_seq_len = max_seq_len
        self.generated_tokens = 0

    def __call__(self, messages: Sequence[dict[str, str]], record: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        answers = 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                out.append(dict(message))
                continue
            if answers == self.settings.max_answers:
                out = _through_last_answer(out)
                break
            answers += 1
            room = self.max_seq_len - len(chat.prompt_ids(self.engine.tokenizer, out))
            if room <= 0:
                break
            s = self.settings
            result = self.engine.generate(
                messages=out,
                max_new_tokens=min(s.max_new_tokens, room),
                temperature=s.temperature,
                seed=_turn_seed(s.seed, record, turn),
                speculative=False,
            )
            self.generated_tokens += len(result.token_ids)
            out.append({"role": "assistant", "content": result.text})
        return out

    def many(
        self, conversations: Sequence[Sequence[dict[str, str]]], records: Sequence[int]
    ) -> list[list[dict[str, str]]]:
        """`self(messages, record)` for each conversation, batched when greedy with batch_size > 1."""
        s = self.settings
        if s.temperature > 0 or s.batch_size == 1:
            return [self(m, r) for m, r in zip(conversations, records, strict=True)]
        done: list[list[dict[str, str]]] = []
        for g in range(0, len(conversations), s.batch_size):
            done.extend(self._group([list(m) for m in conversations[g : g + s.batch_size]]))
        return done

    def _group(self, conversations: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
        from falcon_core.batch_greedy import greedy_batch

        tok = self.engine.tokenizer
        outs: list[list[dict[str, str]]] = [[] for _ in conversations]
        cursor = [0] * len(conversations)  # next message of each source conversation
        while True:
            todo, prompts, limits = [], [], []
            for i, source in enumerate(conversations):
                while cursor[i] < len(source) and source[cursor[i]]["role"] != "assistant":
                    outs[i].append(dict(source[cursor[i]]))
                    cursor[i] += 1
                if cursor[i] >= len(source):
                    continue
                if sum(m["role"] == "assistant" for m in outs[i]) == self.settings.max_answers:
                    outs[i] = _through_last_answer(outs[i])
                    cursor[i] = len(source)
                    continue
                ids = chat.prompt_ids(tok, outs[i])
                room = self.max_seq_len - len(ids)
                if room <= 0:
                    cursor[i] = len(source)  # later turns would be truncated away
                    continue
                todo.append(i)
                prompts.append(ids)
                limits.append(min(self.settings.max_new_tokens, room))
            if not todo:
                return outs
            answers = greedy_batch(self.engine.target, prompts, limits, self.engine.eos_ids)
            for i, answer in zip(todo, answers, strict=True):
                ids = [t for t in answer if t not in self.engine.eos_ids]
                self.generated_tokens += len(ids)  # as `Engine` counts: without the EOS
                text = tok.decode(ids, skip_special_tokens=True)
                outs[i].append({"role": "assistant", "content": text})
                cursor[i] += 1


def _through_last_answer(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` up to and including its last assistant message (the conversation has one)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[: last + 1]


def _turn_seed(seed: int, record: int, turn: int) -> int:
    return int(hashlib.sha256(f"{seed}:{record}:{turn}".encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class ShardSettings:
    """What every `ShardStage` actor needs (sent once, at construction)."""

    model_path: str
    output: str
    dtype: CacheDtype
    max_seq_len: int
    topk: int = 0
    batch_size: int = 8
    batch_tokens: int = 16384
    threads: int = 1
    """torch CPU threads per actor (ignored on GPU)."""
    device: str = "cpu"
    regenerate: RegenerateSettings | None = None
    storage_options: dict[str, Any] | None = None


class ShardStage:
    """Ray Data callable (actor pool): shard rows in, one row per written shard out.

    A shard row holds `shard` (its index) and `pieces`, the JSON list of `[block, [row, ...], [record,
    ...]]` that locate its records in `blocks` (object refs of stage 2's materialized output) and give
    their input-order numbers.
    """

    def __init__(self, settings: ShardSettings, blocks: Sequence[Any]) -> None:
        from transformers import AutoTokenizer

        from falcon_core.generate import Engine
        from falcon_core.target import load_target

        if settings.device == "cpu":
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.blocks = list(blocks)
        self.target = load_target(settings.model_path, dtype=settings.dtype, device=settings.device)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        self.forward = TargetForward(
            self.target, settings.dtype, settings.topk, settings.batch_size, settings.batch_tokens
        )
        self.regenerator = (
            Regenerator(Engine(self.target, self.tokenizer), settings.regenerate, settings.max_seq_len)
            if settings.regenerate is not None
            else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self._shard(int(k), str(p)) for k, p in zip(batch["shard"], batch["pieces"], strict=True)]
        return {key: np.array([r[key] for r in rows]) for key in rows[0]}

    def _shard(self, index: int, pieces: str) -> dict[str, Any]:
        start = time.perf_counter()
        parts = [
            ray.get(self.blocks[b]).take(rows).append_column("record", pa.array(numbers, pa.int64()))
            for b, rows, numbers in json.loads(pieces)
        ]
        table = pa.concat_tables(parts).sort_by("record")
        generated = 0
        if self.regenerator is not None:
            before = self.regenerator.generated_tokens
            numbers = [int(r) for r in table["record"].to_pylist()]
            conversations = self.regenerator.many(
                [json.loads(m) for m in table["messages"].to_pylist()], numbers
            )
            records = [self._rendered(m, r) for m, r in zip(conversations, numbers, strict=True)]
            generated = self.regenerator.generated_tokens - before
        else:
            records = _records_of(table)
        shard = ShardData.from_records(self.forward(records))
        s = self.settings
        written = write_shard(s.output, shard_name(index), shard, s.storage_options)
        return {
            "shard": index,
            "path": written.path,
            "records": shard.num_records,
            "tokens": shard.num_tokens,
            "sha256": written.sha256,
            "bytes": written.bytes,
            "seconds": time.perf_counter() - start,
            "generated_tokens": generated,
            "pid": os.getpid(),
        }

    def _rendered(self, messages: list[dict[str, str]], record: int) -> RenderedRecord:
        rendered = render_record(self.tokenizer, messages, self.settings.max_seq_len)
        if rendered.skip:  # cannot happen when the source rendered: the first answer starts as early
            raise RuntimeError(f"record {record}: regenerated conversation is unusable ({rendered.skip})")
        return rendered


def _records_of(table: pa.Table) -> list[RenderedRecord]:
    """Rendered records of stage-2 rows, as numpy views of the list columns."""
    ids = table["input_ids"].combine_chunks()
    mask = table["loss_mask"].combine_chunks()
    lengths = ids.value_lengths().to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    id_values = ids.flatten().to_numpy()  # flatten() honours slices, `.values` would not
    mask_values = mask.flatten().to_numpy()
    return [
        RenderedRecord(id_values[offsets[i] : offsets[i + 1]], mask_values[offsets[i] : offsets[i + 1]])
        for i in range(len(table))
    ]
