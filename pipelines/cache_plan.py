"""The shard plan of a hidden-state cache: which input records go into which shard, decided up front.

Records are numbered in *input order*: input files in sorted order, and inside a file the order of its
records (only records that parsed get a number). A shard takes the next usable records (those not
skipped at rendering) until it holds at least `shard_tokens` tokens; the last shard takes what is left.
The plan is a pure function of the rendered input and the settings, never of how the work is split
across actors, so a rerun (after a kill, or after input was appended) plans the same shards, and a
shard already in the manifest is reused exactly when its record range and input digest are unchanged.
Input appended at the end changes only the last, unfilled shard and adds new ones after it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipelines.hidden_cache import Manifest, ShardEntry, shard_name


@dataclass(frozen=True)
class RecordInfo:
    """What planning needs to know of one rendered record."""

    file: int
    """Position of its file in the sorted input list."""
    index: int
    """Position among the parsed records of that file."""
    tokens: int
    """Rendered length after truncation to max_seq_len."""
    digest: str
    """Digest of its rendered tokens and loss mask."""
    skip: str = ""
    """Why it cannot be cached ("" when it can)."""


@dataclass(frozen=True)
class ReadCounts:
    """Per input file: records skipped (reason -> n) or repaired while reading, and where."""

    file: int
    skipped: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlannedShard:
    index: int
    first_record: int
    """Input-order number of its first record."""
    end_record: int
    """One past its last record; skipped records in between are not cached."""
    records: int
    tokens: int
    source_sha256: str
    """Digest over its records' numbers and digests."""

    @property
    def path(self) -> str:
        return shard_name(self.index)


@dataclass(frozen=True)
class CachePlan:
    shards: tuple[PlannedShard, ...]
    file_offsets: tuple[int, ...]
    """Input-order number of each file's first record."""
    num_records: int
    """Parsed records in the plan (after `max_records`), usable or not."""
    read_skipped: dict[str, int]
    """Reason -> records skipped while reading (they never got a number)."""
    render_skipped: dict[str, int]
    """Reason -> planned records skipped at rendering."""
    fixed: dict[str, int]
    problems: tuple[str, ...]
    """The first problems met while reading, each with its file and place."""

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def records_read(self) -> int:
        return self.num_records + sum(self.read_skipped.values())

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self.read_skipped) + Counter(self.render_skipped)
        return dict(sorted(total.items()))

    def reusable(self, manifest: Manifest | None) -> list[ShardEntry]:
        """Entries of `manifest` that this plan would write identically (same path, range, inputs)."""
        if manifest is None:
            return []
        planned = {(s.path, s.first_record, s.end_record, s.source_sha256) for s in self.shards}
        return [
            e for e in manifest.shards if (e.path, e.first_record, e.end_record, e.source_sha256) in planned
        ]


def plan_shards(
    records: Iterable[RecordInfo],
    read_counts: Sequence[ReadCounts],
    num_files: int,
    shard_tokens: int,
    max_records: int | None = None,
) -> CachePlan:
    """Number the records in input order, keep the first `max_records`, and cut them into shards."""
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    ordered = sorted(records, key=lambda r: (r.file, r.index))
    per_file = Counter(r.file for r in ordered)
    offsets, total = [], 0
    for f in range(num_files):
        offsets.append(total)
        total += per_file.get(f, 0)
    for g, r in enumerate(ordered):
        if r.index != g - offsets[r.file]:
            raise ValueError(f"record numbers of file {r.file} are not contiguous (missing before {r.index})")
    if max_records is not None:
        ordered = ordered[:max_records]

    read_skipped: Counter[str] = Counter()
    fixed: Counter[str] = Counter()
    problems: list[str] = []
    for counts in sorted(read_counts, key=lambda c: c.file):
        read_skipped.update(counts.skipped)
        fixed.update(counts.fixed)
        problems.extend(counts.problems)

    shards: list[PlannedShard] = []
    members: list[tuple[int, RecordInfo]] = []
    tokens = 0
    for g, r in enumerate(ordered):
        if r.skip:
            continue
        members.append((g, r))
        tokens += r.tokens
        if tokens >= shard_tokens:
            shards.append(_shard(len(shards), members))
            members, tokens = [], 0
    if members:
        shards.append(_shard(len(shards), members))
    return CachePlan(
        shards=tuple(shards),
        file_offsets=tuple(offsets),
        num_records=len(ordered),
        read_skipped=dict(sorted(read_skipped.items())),
        render_skipped=dict(sorted(Counter(r.skip for r in ordered if r.skip).items())),
        fixed=dict(sorted(fixed.items())),
        problems=tuple(problems[:20]),
    )


def _shard(index: int, members: list[tuple[int, RecordInfo]]) -> PlannedShard:
    digest = hashlib.sha256()
    for g, r in members:
        digest.update(f"{g}:{r.digest};".encode())
    return PlannedShard(
        index=index,
        first_record=members[0][0],
        end_record=members[-1][0] + 1,
        records=len(members),
        tokens=sum(r.tokens for _, r in members),
        source_sha256=digest.hexdigest(),
    )
