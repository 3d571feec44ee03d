"""Durable replay state and audit log of remote commands (SQLite in WAL mode).

What is kept, in one database file (``synchronous=FULL``: everything a method has
returned from survives a process kill and a power loss):

* ``counters``: the highest counter accepted per issuer. This is the replay guard that
  never forgets: a command whose counter is not above it is rejected, however old.
  One row per issuer, never pruned.
* ``commands``: recently accepted command ids with their state and result, so that a
  redelivered command is recognised (``replayed_id``) and its stored result can be sent
  again instead of running it twice. Bounded: a finished command is kept until
  ``id_retention_ms`` after it expired, and at most ``max_ids`` rows are kept (oldest
  finished ones go first). Forgetting an id is safe because its counter stays below the
  issuer's counter.
* ``audit``: every decision (accepted, rejected by the verifier, each recorded outcome
  with its ``reason``, interrupted), the newest ``max_audit_rows`` rows.

The crash window. :meth:`ReplayStore.accept` records the id and advances the counter,
durably, *before* the command runs; :meth:`ReplayStore.record_result` records the
outcome after. A command still in state ``accepted`` when the store is opened was
accepted by a process that died before recording an outcome: it may or may not have
taken effect. It is marked ``interrupted`` (listed in :attr:`ReplayStore.interrupted`
for reporting) and is never run again; a redelivery of it is rejected as ``replayed_id``
and answered with that outcome. At-most-once, never at-least-once: the cloud re-issues
(new id, new counter) if it still wants the effect.

If the database is unusable at open (corrupt, not ours), it is moved aside
(``<db>.corrupt-<time>-<pid>``, never deleted) and a fresh one starts; counters that can
still be read from the damaged file are carried over. The same happens, without the
move, when the database is missing but its lock file shows it existed. Either way the
reset time is stored so that every command issued before it is rejected
(``replay_state_reset``): ids and counters accepted before the loss may be gone, so
nothing from that period is trusted. Commands issued after the reset are judged
normally. (A wall clock far in the future at reset time would block commands until the
clock passes it again; deleting the database *and* its lock file starts clean.)

One process at a time owns the database (``<db>.lock``, flock); every method is
thread-safe.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import structlog
from pydantic import BaseModel, ConfigDict, Field

from agent.commands.envelope import REPLAYED_COUNTER, REPLAYED_ID, CommandRejected, VerifiedCommand
from agent.errors import TransientError
from agent.sqlitefiles import UnusableDatabase, connect_wal, move_aside, quick_check, take_file_lock

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 1
MAX_RESULT_BYTES: Final = 64 * 1024
MAX_DETAIL_CHARS: Final = 512

# States of an accepted command: ACCEPTED until an outcome is recorded. The outcomes are
# the executor's final states (agent.commands.results) plus INTERRUPTED, which only the
# store assigns to a command found accepted at open. REJECTED after acceptance means the
# executor refused it (rate limit, parameters checked again); a command the verifier
# rejects is never stored, only audited.
ACCEPTED: Final = "accepted"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
REJECTED: Final = "rejected"
EXPIRED: Final = "expired"
INTERRUPTED: Final = "interrupted"
FINAL_STATES: Final = (SUCCEEDED, FAILED, TIMED_OUT, REJECTED, EXPIRED, INTERRUPTED)
INTERRUPTED_RESULT: Final = {"reason": "interrupted",
                             "detail": "the agent stopped after accepting the command and before it "
                                       "recorded an outcome; it may or may not have taken effect"}


class ReplaySettings(BaseModel):
    """Where replay state lives and how much of it is kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="SQLite database file; <path>.lock beside it")
    max_ids: int = Field(default=10_000, ge=100, le=1_000_000,
                         description="most command ids (with results) kept for redelivery")
    id_retention_ms: int = Field(default=7 * 86_400_000, ge=0,
                                 description="how long after its expiry a finished command id is kept")
    max_audit_rows: int = Field(default=10_000, ge=100, le=1_000_000)


@dataclass(frozen=True, slots=True)
class StoredCommand:
    command_id: str
    issuer: str
    name: str
    counter: int
    digest: str
    state: str
    result: dict[str, Any] | None
    accepted_ms: int
    finished_ms: int | None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts_ms: int
    command_id: str | None
    issuer: str | None
    name: str | None
    decision: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """Replay state lost at open: the database was unusable (and moved aside) or missing."""

    moved_to: Path | None
    problem: str
    reset_at_ms: int
    counters_salvaged: int


class ReplayBusy(TransientError):
    """Another process holds the replay database."""


class ReplayUnavailable(TransientError):
    """SQLite failed; no command may run until it works again."""



_SCHEMA: Final = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE counters (
    issuer TEXT PRIMARY KEY,
    counter INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE commands (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    issuer TEXT NOT NULL,
    name TEXT NOT NULL,
    counter INTEGER NOT NULL,
    digest TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    accepted_ms INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{state}'" for state in (ACCEPTED, *FINAL_STATES))})),
    result TEXT,
    finished_ms INTEGER
);
CREATE INDEX commands_open ON commands (state) WHERE state = '{ACCEPTED}';
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    command_id TEXT,
    issuer TEXT,
    name TEXT,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
_TABLES: Final = frozenset({"meta", "counters", "commands", "audit"})
_COMMAND_COLUMNS: Final = "id, issuer, name, counter, digest, state, result, accepted_ms, finished_ms"


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _stored(row: Sequence[Any]) -> StoredCommand:
    result = json.loads(row[6]) if row[6] is not None else None
    return StoredCommand(row[0], row[1], row[2], row[3], row[4], row[5], result, row[7], row[8])


class StoreReplayView:
    """Read-only view of a :class:`ReplayStore`, the ``ReplayView`` of ``CommandVerifier.verify``."""

    def __init__(self, store: ReplayStore) -> None:
        self._store = store

    def seen(self, command_id: str) -> bool:
        return self._store._query_one("SELECT 1 FROM commands WHERE id = ?", (command_id,)) is not None

    def counter_for(self, issuer: str) -> int | None:
        row = self._store._query_one("SELECT counter FROM counters WHERE issuer = ?", (issuer,))
        return None if row is None else int(row[0])

    def reset_at_ms(self) -> int | None:
        return self._store.reset_at_ms


class ReplayStore:
    """Replay state and audit log of remote commands; see the module docstring."""

    def __init__(self, settings: ReplaySettings | str | Path, *,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        if not isinstance(settings, ReplaySettings):
            settings = ReplaySettings(path=Path(settings))
        self.settings = settings
        self.path = Path(settings.path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.recovery: Recovery | None = None
        self._clock = clock_ms
        self._lock = threading.RLock()
        self._closed = False
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        missing = self.lock_path.exists() and not self.path.exists()
        self._lock_fd = self._take_file_lock()
        try:
            self._conn = self._open_checked(missing)
            reset = self._query_one("SELECT value FROM meta WHERE key = 'reset_at_ms'")
            self.reset_at_ms: int | None = None if reset is None else int(reset[0])
            self.interrupted: tuple[StoredCommand, ...] = self._mark_interrupted()
        except BaseException:
            if hasattr(self, "_conn"):
                self._conn.close()
            os.close(self._lock_fd)
            raise
        log.info("replay_store_opened", path=str(self.path), interrupted=len(self.interrupted),
                 reset_at_ms=self.reset_at_ms)

    # ------------------------------------------------------------------ opening

    def _take_file_lock(self) -> int:
        fd = take_file_lock(self.lock_path)
        if fd is None:
            raise ReplayBusy(f"{self.path} is in use by another process")
        return fd

    def _connect(self) -> sqlite3.Connection:
        return connect_wal(self.path, "full")

    def _check(self, conn: sqlite3.Connection) -> None:
        tables = quick_check(conn)
        if not tables:
            # One transaction: a kill here leaves an empty file, not a half-made schema.
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} "
                               f"INSERT INTO meta VALUES ('schema_version', {SCHEMA_VERSION}); COMMIT;")
            return
        if not tables >= _TABLES:
            raise UnusableDatabase(f"not a command replay database (tables {sorted(tables)})")
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise UnusableDatabase(f"unsupported replay schema {None if version is None else version[0]!r}")

    def _open_checked(self, missing: bool) -> sqlite3.Connection:
        """Open the database; ``missing``: it was created before (the lock file exists) and is gone now."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            self._check(conn)
            if missing:
                self._reset(conn, "the database file was missing (deleted?)", None, {})
            return conn
        except (UnusableDatabase, sqlite3.DatabaseError) as exc:
            if conn is not None:
                conn.close()
            problem = str(exc)
        counters = self._salvage_counters()
        moved_to = move_aside(self.path)
        conn = self._connect()
        self._check(conn)
        self._reset(conn, problem, moved_to, counters)
        return conn

    def _reset(self, conn: sqlite3.Connection, problem: str, moved_to: Path | None,
               counters: dict[str, int]) -> None:
        """Start over after losing replay state: distrust everything issued before now."""
        reset = self._clock()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO meta VALUES ('reset_at_ms', ?)", (reset,))
        conn.executemany("INSERT INTO counters VALUES (?, ?, ?)", [(i, c, reset) for i, c in counters.items()])
        where = f"database moved to {moved_to.name}: " if moved_to is not None else ""
        conn.execute("INSERT INTO audit (ts_ms, decision, reason, detail) VALUES (?, 'reset', 'replay_state_lost', ?)",
                     (reset, f"{where}{problem}"[:MAX_DETAIL_CHARS]))
        conn.execute("COMMIT")
        self.recovery = Recovery(moved_to, problem, reset, len(counters))
        log.error("replay_state_lost", path=str(self.path), moved_to=str(moved_to), problem=problem,
                  counters_salvaged=len(counters), reset_at_ms=reset)

    def _salvage_counters(self) -> dict[str, int]:
        """Best effort: the per-issuer counters of a damaged database, if still readable."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error:
            return {}
        found: dict[str, int] = {}
        try:
            for sql in ("SELECT issuer, counter FROM counters",
                        "SELECT issuer, max(counter) FROM commands GROUP BY issuer"):
                try:
                    rows = conn.execute(sql).fetchall()
                except sqlite3.Error:
                    continue
                for issuer, counter in rows:
                    if type(issuer) is str and type(counter) is int:
                        found[issuer] = max(counter, found.get(issuer, counter))
        finally:
            conn.close()
        return found

    def _mark_interrupted(self) -> tuple[StoredCommand, ...]:
        """Commands accepted by a process that died before recording their outcome."""
        now = self._clock()
        result = json.dumps(INTERRUPTED_RESULT)
        marked: list[StoredCommand] = []

        def work() -> None:
            rows = self._conn.execute(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE state = ? ORDER BY seq",
                                      (ACCEPTED,)).fetchall()
            for row in rows:
                self._conn.execute("UPDATE commands SET state = ?, result = ?, finished_ms = ? WHERE id = ?",
                                   (INTERRUPTED, result, now, row[0]))
                self._audit_row(now, row[0], row[1], row[2], INTERRUPTED, INTERRUPTED,
                                "accepted before a restart, outcome unknown; not run again")
                marked.append(_stored((*row[:5], INTERRUPTED, result, row[7], now)))
            self._prune(now)

        self._transaction(work)
        for command in marked:
            log.warning("command_interrupted", command_id=command.command_id, name=command.name,
                        issuer=command.issuer)
        return tuple(marked)

    # ------------------------------------------------------------------ helpers

    def _transaction(self, work: Callable[[], object], *, durable: bool = True) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("replay store is closed")
            try:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        work()
                        self._conn.execute("COMMIT")
                    except BaseException:
                        if self._conn.in_transaction:
                            self._conn.execute("ROLLBACK")
                        raise
                finally:
                    if not durable:
                        self._conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise ReplayUnavailable(f"{self.path}: {exc}") from exc

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("replay store is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise ReplayUnavailable(f"{self.path}: {exc}") from exc

    def _query_one(self, sql: str, params: Sequence[object] = ()) -> Any:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    def _audit_row(self, ts_ms: int, command_id: str | None, issuer: str | None, name: str | None,
                   decision: str, reason: str, detail: str) -> None:
        self._conn.execute(
            "INSERT INTO audit (ts_ms, command_id, issuer, name, decision, reason, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ts_ms, command_id, issuer, name, decision, reason, detail[:MAX_DETAIL_CHARS]))
        self._conn.execute("DELETE FROM audit WHERE seq <= (SELECT max(seq) FROM audit) - ?",
                           (self.settings.max_audit_rows,))

    def _prune(self, now_ms: int) -> None:
        self._conn.execute("DELETE FROM commands WHERE state != ? AND expires_ms + ? < ?",
                           (ACCEPTED, self.settings.id_retention_ms, now_ms))
        self._conn.execute(
            "DELETE FROM commands WHERE seq IN (SELECT seq FROM commands WHERE state != ? ORDER BY seq "
            "LIMIT max(0, (SELECT count(*) FROM commands) - ?))", (ACCEPTED, self.settings.max_ids))

    # ------------------------------------------------------------------ API

    def view(self) -> StoreReplayView:
        return StoreReplayView(self)

    def accept(self, command: VerifiedCommand) -> None:
        """Durably record ``command`` as accepted, before it runs.

        Re-checks id and counter inside the transaction, so of two racing deliveries only
        one is accepted; the other raises :class:`CommandRejected` (``replayed_id`` or
        ``replayed_counter``). Raises :class:`ReplayUnavailable` when SQLite fails: then
        the command must not run.
        """
        now = self._clock()

        def work() -> None:
            if self._conn.execute("SELECT 1 FROM commands WHERE id = ?", (command.command_id,)).fetchone():
                raise CommandRejected(REPLAYED_ID, f"command {command.command_id} was accepted before",
                                      command_id=command.command_id, issuer=command.issuer, name=command.name)
            row = self._conn.execute("SELECT counter FROM counters WHERE issuer = ?", (command.issuer,)).fetchone()
            if row is not None and command.counter <= row[0]:
                raise CommandRejected(REPLAYED_COUNTER, f"counter {command.counter} is not above {row[0]}, the last "
                                      f"accepted from {command.issuer}", command_id=command.command_id,
                                      issuer=command.issuer, name=command.name)
            self._conn.execute(
                "INSERT INTO commands (id, issuer, name, counter, digest, expires_ms, accepted_ms, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (command.command_id, command.issuer, command.name, command.counter, command.digest,
                 command.expires_at_ms, now, ACCEPTED))
            self._conn.execute(
                "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (issuer) DO UPDATE "
                "SET counter = excluded.counter, updated_ms = excluded.updated_ms",
                (command.issuer, command.counter, now))
            self._audit_row(now, command.command_id, command.issuer, command.name, ACCEPTED, "",
                            f"counter {command.counter}, kid {command.kid}")
            self._prune(now)

        self._transaction(work)

    def record_result(self, command_id: str, state: str, result: Mapping[str, Any]) -> None:
        """Durably record the outcome of an accepted command (``state`` in :data:`FINAL_STATES`).

        ``result`` (the outcome's detail; its ``reason``, if any, goes to the audit log) must be
        JSON-serialisable and at most :data:`MAX_RESULT_BYTES` encoded;
        KeyError if the id was never accepted (or already pruned), ValueError if its
        outcome is already recorded (for example marked interrupted at a restart).
        """
        if state not in FINAL_STATES:
            raise ValueError(f"state must be one of {FINAL_STATES}, got {state!r}")
        try:
            encoded = json.dumps(dict(result), allow_nan=False, separators=(",", ":"), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"result is not JSON-serialisable: {exc}") from None
        if len(encoded.encode("utf-8")) > MAX_RESULT_BYTES:
            raise ValueError(f"result is {len(encoded)} bytes encoded, limit {MAX_RESULT_BYTES}")
        now = self._clock()

        def work() -> None:
            row = self._conn.execute("SELECT state, issuer, name FROM commands WHERE id = ?",
                                     (command_id,)).fetchone()
            if row is None:
                raise KeyError(command_id)
            if row[0] != ACCEPTED:
                raise ValueError(f"command {command_id} already has outcome {row[0]}")
            self._conn.execute("UPDATE commands SET state = ?, result = ?, finished_ms = ? WHERE id = ?",
                               (state, encoded, now, command_id))
            reason = result.get("reason")
            self._audit_row(now, command_id, row[1], row[2], state, reason[:64] if isinstance(reason, str) else "",
                            "")

        self._transaction(work)

    def result(self, command_id: str) -> StoredCommand | None:
        """The stored state and result of an accepted command, None if unknown (or pruned)."""
        row = self._query_one(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id = ?", (command_id,))
        return None if row is None else _stored(row)

    def audit(self, decision: str, *, reason: str = "", detail: str = "", command_id: str | None = None,
              issuer: str | None = None, name: str | None = None) -> None:
        """Add an audit row (the store writes accepted/outcome rows itself; use this for the rest).

        Written without an fsync of its own (it is synced with the next durable write):
        a flood of rejected payloads must not turn into a flood of disk flushes.
        """
        now = self._clock()
        self._transaction(lambda: self._audit_row(now, command_id, issuer, name, decision, reason, detail),
                          durable=False)

    def audit_rejection(self, rejected: CommandRejected) -> None:
        self.audit(REJECTED, reason=rejected.reason, detail=rejected.detail, command_id=rejected.command_id,
                   issuer=rejected.issuer, name=rejected.name)

    def recent_audit(self, n: int = 100) -> list[AuditEntry]:
        """The newest ``n`` audit rows, newest first."""
        rows = self._query("SELECT ts_ms, command_id, issuer, name, decision, reason, detail FROM audit "
                           "ORDER BY seq DESC LIMIT ?", (max(0, n),))
        return [AuditEntry(*row) for row in rows]

    def counters(self) -> dict[str, int]:
        """The highest accepted counter of every issuer seen."""
        return {issuer: counter for issuer, counter in self._query("SELECT issuer, counter FROM counters")}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.close()
            finally:
                os.close(self._lock_fd)

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
