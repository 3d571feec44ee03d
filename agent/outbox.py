"""Durable store-and-forward outbox for uplink batches (SQLite in WAL mode).

A batch enters with :meth:`Outbox.commit`, which assigns its sequence number inside
the same transaction that stores it, and leaves only with :meth:`Outbox.ack` (after
the broker acknowledged it), by TTL expiry or by eviction when the outbox is full.
Expiry, eviction and rejected records are counted per priority class in the database
and reported upstream until the report is acknowledged.

Guarantees (docs/protocol.md, "Outbox guarantees"):

* ``synchronous="full"`` (default): a batch whose commit returned survives a process
  kill and a power loss. ``"normal"``: it survives a process kill, but the most recent
  commits can be lost on power loss (WAL is synced at checkpoints only).
* Sequence numbers are never reused: the next number lives in the ``meta`` table,
  updated in the storing transaction, and a sidecar file (``<db>.seq``, written
  atomically and fsynced *before* the transaction commits) reserves blocks of numbers
  so that even a lost or corrupt database, or a commit lost on power loss with
  ``synchronous="normal"``, never leads to a number being handed out twice.
* A corrupt database found at open is moved aside (``<db>.corrupt-<time>``, never
  deleted) and a fresh one starts above the last reserved sequence number.
* Size: live pages of the database file (``(page_count - freelist_count) *
  page_size``, payloads plus SQLite overhead) are kept under ``max_bytes`` by evicting
  the oldest batches of the lowest priority class first; the WAL is capped separately
  (checkpoint every ``wal_bytes`` and truncated to that size).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import zip_longest
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import TransientError
from agent.logs import LogLimiter
from agent.sqlitefiles import UnusableDatabase, connect_wal, fsync_dir, move_aside, quick_check, take_file_lock

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 1
SEQ_RESERVE_BLOCK: Final = 1024
SANE_WALL_CLOCK_NS: Final = 1_577_836_800_000_000_000  # 2020-01-01: earlier = unsynced
ROW_OVERHEAD_BYTES: Final = 96  # estimate of SQLite record + index cost per batch
MiB: Final = 1024 * 1024

DrainOrder = Literal["oldest_first", "newest_first", "interleaved"]
LossCause = Literal["evicted", "expired", "rejected", "dropped"]
LOSS_CAUSES: Final[tuple[LossCause, ...]] = ("evicted", "expired", "rejected", "dropped")


class Priority(IntEnum):
    """Priority classes; a lower value is sent first and evicted last."""

    EVENT = 0
    TELEMETRY = 1
    BULK = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class OutboxTtl(BaseModel):
    """How long a batch may wait in the outbox, per priority class, in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: int = Field(default=30 * 86_400, gt=0)
    telemetry: int = Field(default=7 * 86_400, gt=0)
    bulk: int = Field(default=2 * 86_400, gt=0)

    def of(self, priority: Priority) -> int:
        seconds: int = getattr(self, priority.label)
        return seconds


class OutboxSettings(BaseModel):
    """Outbox and batching settings (the ``outbox`` section of the agent config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="SQLite database file; <path>.seq and <path>.lock beside it")
    max_bytes: int = Field(default=64 * MiB, ge=1 * MiB,
                           description="Bound on live database pages (payloads + overhead)")
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="full: committed batches survive power loss; normal: faster, the most "
                    "recent commits can be lost on power loss (never on a process crash)")
    ttl_seconds: OutboxTtl = Field(default_factory=OutboxTtl)
    flush_interval_ms: int = Field(default=1000, ge=10, le=60_000,
                                   description="Longest time a record waits in memory")
    max_payload_bytes: int = Field(default=131_072, ge=1024, le=8 * MiB,
                                   description="Largest MQTT payload (AWS IoT Core: 128 KiB)")
    compression: Literal["zstd", "zlib", "none"] = "zstd"
    drain_order: DrainOrder = Field(
        default="interleaved",
        description="Order of the backlog within a priority class; interleaved (default) drains "
                    "the backlog oldest first, alternating with the newest (live) batch")

    @model_validator(mode="after")
    def _room_for_batches(self) -> OutboxSettings:
        if self.max_bytes < 8 * self.max_payload_bytes:
            raise ValueError("max_bytes must be at least 8 times max_payload_bytes")
        return self


class SealableBatch(Protocol):
    """An encoded batch that gets its sequence number when it is stored."""

    @property
    def stream(self) -> str: ...

    @property
    def sample_count(self) -> int: ...

    def seal(self, seq: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class StoredBatch:
    seq: int
    stream: str
    priority: Priority
    payload: bytes
    sample_count: int
    created_ns: int


@dataclass(frozen=True, slots=True)
class LossCount:
    """Batches and samples lost for one cause in one priority class.

    Causes: ``evicted`` (outbox full), ``expired`` (TTL), ``rejected`` (the encoder
    refused records), ``dropped`` (never stored: the outbox was unavailable and the
    in-memory buffer was full). ``batches`` is 0 for records lost before they were
    batched; ``samples`` counts values (a sample or an aggregate is one, an event its
    samples, at least one), so it is the measure comparable across causes.
    """

    priority: Priority
    cause: LossCause
    batches: int
    samples: int


@dataclass(frozen=True, slots=True)
class LossReport:
    """Losses not yet acknowledged upstream; pass it back to ``ack_loss_report``."""

    losses: tuple[LossCount, ...]
    databases_replaced: int

    @property
    def empty(self) -> bool:
        return not self.losses and not self.databases_replaced

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: ``{"event": {"evicted": {"batches": 1, "samples": 10}}, ...}``."""
        classes: dict[str, dict[str, dict[str, int]]] = {}
        for loss in self.losses:
            classes.setdefault(loss.priority.label, {})[loss.cause] = {
                "batches": loss.batches, "samples": loss.samples}
        return {"losses": classes, "databases_replaced": self.databases_replaced}


@dataclass(frozen=True, slots=True)
class Recovery:
    """A database that could not be used at open and was moved aside."""

    moved_to: Path
    problem: str


@dataclass(frozen=True, slots=True)
class OutboxStats:
    batches: dict[str, int]
    samples: dict[str, int]
    payload_bytes: int
    used_bytes: int
    file_bytes: int
    max_bytes: int
    next_seq: int
    lost_total: dict[str, dict[str, int]] = field(default_factory=dict)


class OutboxBusy(TransientError):
    """Another process holds the outbox (two agents on one database)."""


class OutboxUnavailable(TransientError):
    """SQLite failed (disk full, I/O error, corruption found while running)."""


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    sample_count INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_class ON batches (priority, seq);
CREATE INDEX IF NOT EXISTS batches_by_age ON batches (priority, created_ns);
CREATE TABLE IF NOT EXISTS losses (
    priority INTEGER NOT NULL,
    cause TEXT NOT NULL,
    batches_total INTEGER NOT NULL DEFAULT 0,
    samples_total INTEGER NOT NULL DEFAULT 0,
    batches_unreported INTEGER NOT NULL DEFAULT 0,
    samples_unreported INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (priority, cause)
) WITHOUT ROWID;
"""


class Outbox:
    """The outbox; every method is thread-safe (one connection behind a lock)."""

    def __init__(self, settings: OutboxSettings, *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self._log_limiter = LogLimiter()
        self.path = Path(settings.path)
        self.sidecar_path = self.path.with_name(self.path.name + ".seq")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.recovery: Recovery | None = None
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = self._take_file_lock()
        try:
            self._reserved = self._read_sidecar()
            self._conn, fresh = self._open_checked()
            self._page_size = self._scalar("PRAGMA page_size") or 4096
            self._next_seq = self._start_seq(fresh)
        except BaseException:
            if hasattr(self, "_conn"):
                self._conn.close()
            os.close(self._lock_fd)
            raise
        log.info("outbox_opened", path=str(self.path), next_seq=self._next_seq,
                 synchronous=settings.synchronous, batches=self._scalar(
                     "SELECT count(*) FROM batches"), used_bytes=self._used_bytes())

    # ------------------------------------------------------------------ opening

    def _take_file_lock(self) -> int:
        fd = take_file_lock(self.lock_path)
        if fd is None:
            raise OutboxBusy(f"{self.path} is in use by another process")
        return fd

    def _read_sidecar(self) -> int | None:
        try:
            data = json.loads(self.sidecar_path.read_text(encoding="utf-8"))
            reserved = data["reserved_through"]
            if type(reserved) is not int or reserved < 0:
                raise ValueError(f"bad reserved_through {reserved!r}")
            return reserved
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("outbox_sidecar_unreadable", path=str(self.sidecar_path), error=str(exc))
            return None

    def _write_sidecar(self, reserved: int) -> None:
        """Atomically record that numbers up to ``reserved`` may have been handed out."""
        tmp = self.sidecar_path.with_name(self.sidecar_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"reserved_through": reserved}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.sidecar_path)
        fsync_dir(self.path.parent)
        self._reserved = reserved

    def _connect(self) -> sqlite3.Connection:
        conn = connect_wal(self.path, self.settings.synchronous)
        try:
            wal_bytes = max(256 * 1024, min(4 * MiB, self.settings.max_bytes // 8))
            conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_bytes // page_size)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check(self, conn: sqlite3.Connection) -> bool:
        """Check integrity and schema; True when the database is new and empty."""
        tables = quick_check(conn)
        if not tables:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            return True
        if not {"meta", "batches", "losses"} <= tables:
            raise UnusableDatabase(f"not an outbox database (tables {sorted(tables)})")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != SCHEMA_VERSION or "next_seq" not in meta:
            raise UnusableDatabase(f"unsupported outbox schema {meta.get('schema_version')!r}"
                            f" or no sequence counter")
        return False

    def _open_checked(self) -> tuple[sqlite3.Connection, bool]:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            fresh = self._check(conn)
            return conn, fresh
        except (UnusableDatabase, sqlite3.DatabaseError) as exc:
            if conn is not None:
                conn.close()
            problem = str(exc)
        salvaged = self._salvage_next_seq()
        self.recovery = self._move_aside(problem)
        if salvaged is not None and salvaged - 1 > (self._reserved or 0):
            self._write_sidecar(salvaged - 1)
        conn = self._connect()
        self._check(conn)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('databases_replaced', 1)")
        return conn, True

    def _salvage_next_seq(self) -> int | None:
        """Best effort: the sequence counter of a damaged database, if still readable."""
        found: list[int] = []
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error:
            return None
        try:
            for sql in ("SELECT value FROM meta WHERE key = 'next_seq'",
                        "SELECT max(seq) + 1 FROM batches"):
                try:
                    row = conn.execute(sql).fetchone()
                except sqlite3.Error:
                    continue
                if row and type(row[0]) is int:
                    found.append(row[0])
        finally:
            conn.close()
        return max(found, default=None)

    def _move_aside(self, problem: str) -> Recovery:
        target = move_aside(self.path)
        log.error("outbox_database_replaced", path=str(self.path), moved_to=str(target),
                  problem=problem, reserved_seq=self._reserved)
        return Recovery(target, problem)

    def _start_seq(self, fresh: bool) -> int:
        stored = self._scalar("SELECT value FROM meta WHERE key='next_seq'")
        above_reserved = (self._reserved or 0) + 1
        if fresh or stored is None:
            start = above_reserved
        elif self.settings.synchronous == "normal":
            # The last commits may have been lost on power loss after being published.
            start = max(int(stored), above_reserved)
        else:
            start = int(stored)
        if start != stored:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (start,))
        return start

    # ------------------------------------------------------------------ helpers

    def _scalar(self, sql: str, params: Sequence[object] = ()) -> int | None:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _used_bytes(self) -> int:
        pages = (self._scalar("PRAGMA page_count") or 0) - (
            self._scalar("PRAGMA freelist_count") or 0)
        return pages * self._page_size

    def _count_loss(self, priority: int, cause: LossCause, batches: int, samples: int) -> None:
        self._conn.execute(
            "INSERT INTO losses VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (priority, cause) DO UPDATE"
            " SET batches_total = batches_total + excluded.batches_total,"
            " samples_total = samples_total + excluded.samples_total,"
            " batches_unreported = batches_unreported + excluded.batches_unreported,"
            " samples_unreported = samples_unreported + excluded.samples_unreported",
            (priority, cause, batches, samples, batches, samples))

    def _transaction(self, work: Callable[[], object]) -> None:
        self._ensure_open()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                work()
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"{self.path}: {exc}") from exc

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("outbox is closed")

    def _expire(self) -> int:
        """Drop batches older than their class's TTL (inside a transaction)."""
        now = self._clock()
        if now < SANE_WALL_CLOCK_NS:
            return 0  # wall clock not set yet: ages cannot be judged
        dropped = 0
        for priority in Priority:
            # Batches stored before the clock was set get their age counted from now.
            self._conn.execute(
                "UPDATE batches SET created_ns = ? WHERE priority = ? AND created_ns < ?",
                (now, int(priority), SANE_WALL_CLOCK_NS))
            cutoff = now - self.settings.ttl_seconds.of(priority) * 1_000_000_000
            count, samples = self._conn.execute(
                "SELECT count(*), total(sample_count) FROM batches"
                " WHERE priority = ? AND created_ns < ?", (int(priority), cutoff)).fetchone()
            if count:
                self._conn.execute("DELETE FROM batches WHERE priority = ? AND created_ns < ?",
                                   (int(priority), cutoff))
                self._count_loss(priority, "expired", int(count), int(samples))
                log.warning("outbox_expired", priority=priority.label, batches=count,
                            samples=int(samples))
                dropped += int(count)
        return dropped

    def _make_room(self, incoming: int) -> None:
        """Evict oldest batches of the lowest class until ``incoming`` bytes fit."""
        limit = self.settings.max_bytes
        while (deficit := self._used_bytes() + incoming - limit) > 0:
            victims: list[tuple[int, int, int, int]] = []
            freed = 0
            candidates = self._conn.execute(
                "SELECT seq, priority, size, sample_count FROM batches"
                " ORDER BY priority DESC, seq ASC LIMIT 256").fetchall()
            for row in candidates:
                victims.append(row)
                freed += row[2] + ROW_OVERHEAD_BYTES
                if freed >= deficit:
                    break
            if not victims:
                return  # nothing left to evict; the new batches alone exceed the bound
            self._conn.executemany("DELETE FROM batches WHERE seq = ?",
                                   [(v[0],) for v in victims])
            by_class: dict[int, list[int]] = {}
            for _, priority, _, samples in victims:
                counts = by_class.setdefault(priority, [0, 0])
                counts[0] += 1
                counts[1] += samples
            for priority, (batches, samples) in by_class.items():
                self._count_loss(priority, "evicted", batches, samples)
                # A full outbox evicts on every commit: log once a minute per class, with totals.
                if self._log_limiter.allow(("evicted", priority)):
                    log.warning("outbox_evicted", priority=Priority(priority).label,
                                batches=batches, samples=samples, first_seq=victims[0][0],
                                used_bytes=self._used_bytes(), evictions_not_logged=(
                                    self._log_limiter.take_suppressed(("evicted", priority))))

    # ------------------------------------------------------------------ public API

    def commit(self, batches: Sequence[tuple[Priority, SealableBatch]],
               losses: Sequence[LossCount] = ()) -> list[int]:
        """Store batches in one transaction; return their sequence numbers.

        When this returns the batches are durable (see the module doc for what
        ``synchronous`` means). ``losses`` found before storing (rejected records, records
        dropped in memory) are counted in the same transaction.
        """
        with self._lock:
            seqs: list[int] = []

            def work() -> None:
                first = self._next_seq
                last = first + len(batches) - 1
                if batches and (self._reserved is None or last > self._reserved):
                    self._write_sidecar(last + SEQ_RESERVE_BLOCK)
                now = self._clock()
                rows = []
                for offset, (priority, batch) in enumerate(batches):
                    payload = batch.seal(first + offset)
                    if len(payload) > self.settings.max_payload_bytes:
                        raise ValueError(f"payload of {len(payload)} bytes exceeds "
                                         f"max_payload_bytes={self.settings.max_payload_bytes}")
                    rows.append((first + offset, batch.stream, int(Priority(priority)), now,
                                 batch.sample_count, len(payload), payload))
                self._expire()
                pages_per_row = [math.ceil((r[5] + ROW_OVERHEAD_BYTES) / self._page_size)
                                 for r in rows]
                self._make_room(sum(pages_per_row) * self._page_size)
                self._conn.executemany(
                    "INSERT INTO batches (seq, stream, priority, created_ns, sample_count, size,"
                    " payload) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                for loss in losses:
                    self._count_loss(loss.priority, loss.cause, loss.batches, loss.samples)
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                                   (last + 1,))
                self._make_room(0)
                seqs.extend(r[0] for r in rows)

            self._transaction(work)
            self._next_seq += len(seqs)
            return seqs

    def pending(self, limit: int, *, exclude: Collection[int] = (),
                order: DrainOrder | None = None) -> list[StoredBatch]:
        """Up to ``limit`` stored batches to publish, not in ``exclude`` (in flight).

        Classes go strictly by priority (events first). Within a class ``order``
        (default: the configured ``drain_order``) is ``oldest_first``,
        ``newest_first``, or ``interleaved``: newest, oldest, second newest, second
        oldest, ... so live data goes out at once while the backlog keeps draining.
        """
        if limit <= 0:
            return []
        chosen_order = order or self.settings.drain_order
        excluded = set(exclude)
        with self._lock:
            self._transaction(self._expire)
            chosen: list[int] = []
            for priority in Priority:
                if len(chosen) >= limit:
                    break
                want = limit - len(chosen) + len(excluded)
                oldest = [] if chosen_order == "newest_first" else [
                    s for s in self._seqs(priority, "ASC", want) if s not in excluded]
                newest = [] if chosen_order == "oldest_first" else [
                    s for s in self._seqs(priority, "DESC", want) if s not in excluded]
                if chosen_order == "interleaved":
                    candidates = [s for pair in zip_longest(newest, oldest) for s in pair
                                  if s is not None]
                else:
                    candidates = oldest or newest
                for seq in candidates:
                    if seq not in chosen:
                        chosen.append(seq)
                        if len(chosen) >= limit:
                            break
            return self._load(chosen)

    def _seqs(self, priority: Priority, direction: str, limit: int) -> list[int]:
        return [r[0] for r in self._conn.execute(
            f"SELECT seq FROM batches WHERE priority = ? ORDER BY seq {direction} LIMIT ?",
            (int(priority), limit))]

    def _load(self, seqs: list[int]) -> list[StoredBatch]:
        found: dict[int, StoredBatch] = {}
        for start in range(0, len(seqs), 500):
            part = seqs[start:start + 500]
            marks = ",".join("?" * len(part))
            for seq, stream, priority, payload, samples, created in self._conn.execute(
                    "SELECT seq, stream, priority, payload, sample_count, created_ns"
                    f" FROM batches WHERE seq IN ({marks})", part):
                found[seq] = StoredBatch(seq, stream, Priority(priority), bytes(payload),
                                         samples, created)
        return [found[s] for s in seqs if s in found]

    def ack(self, seq: int) -> bool:
        """Remove a batch the broker acknowledged; False if it is no longer stored."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Remove several acknowledged batches in one transaction; return how many."""
        targets = [(int(s),) for s in seqs]
        removed = 0
        with self._lock:
            def work() -> None:
                nonlocal removed
                for target in targets:
                    removed += self._conn.execute(
                        "DELETE FROM batches WHERE seq = ?", target).rowcount

            self._transaction(work)
        return removed

    def expire(self) -> int:
        """Drop expired batches now; return how many."""
        dropped = 0
        with self._lock:
            def work() -> None:
                nonlocal dropped
                dropped = self._expire()

            self._transaction(work)
        return dropped

    def loss_report(self) -> LossReport:
        """Losses not yet acknowledged upstream (they stay until ``ack_loss_report``)."""
        with self._lock:
            self._ensure_open()
            rows = self._conn.execute(
                "SELECT priority, cause, batches_unreported, samples_unreported FROM losses"
                " WHERE batches_unreported > 0 OR samples_unreported > 0"
                " ORDER BY priority, cause").fetchall()
            replaced = self._scalar(
                "SELECT value FROM meta WHERE key = 'databases_replaced'") or 0
        return LossReport(tuple(LossCount(Priority(p), c, b, s) for p, c, b, s in rows),
                          replaced)

    def ack_loss_report(self, report: LossReport) -> None:
        """The report reached the cloud: subtract it (losses counted since then stay)."""
        with self._lock:
            def work() -> None:
                for loss in report.losses:
                    self._conn.execute(
                        "UPDATE losses SET batches_unreported = max(0, batches_unreported - ?),"
                        " samples_unreported = max(0, samples_unreported - ?)"
                        " WHERE priority = ? AND cause = ?",
                        (loss.batches, loss.samples, int(loss.priority), loss.cause))
                if report.databases_replaced:
                    self._conn.execute(
                        "UPDATE meta SET value = max(0, value - ?) WHERE key = 'databases_replaced'",
                        (report.databases_replaced,))

            self._transaction(work)

    def stats(self) -> OutboxStats:
        with self._lock:
            self._ensure_open()
            batches = {p.label: 0 for p in Priority}
            samples = {p.label: 0 for p in Priority}
            payload_bytes = 0
            for priority, count, total_samples, size in self._conn.execute(
                    "SELECT priority, count(*), total(sample_count), total(size) FROM batches"
                    " GROUP BY priority"):
                batches[Priority(priority).label] = int(count)
                samples[Priority(priority).label] = int(total_samples)
                payload_bytes += int(size)
            lost: dict[str, dict[str, int]] = {}
            for priority, cause, lost_batches, lost_samples in self._conn.execute(
                    "SELECT priority, cause, batches_total, samples_total FROM losses"):
                lost[f"{Priority(priority).label}.{cause}"] = {
                    "batches": lost_batches, "samples": lost_samples}
            return OutboxStats(
                batches, samples, payload_bytes, self._used_bytes(),
                (self._scalar("PRAGMA page_count") or 0) * self._page_size,
                self.settings.max_bytes, self._next_seq, lost)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("outbox_checkpoint_failed", error=str(exc))
            self._conn.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
