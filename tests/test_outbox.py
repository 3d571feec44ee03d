"""Outbox on real SQLite files: sequence numbers, priorities, eviction, TTL, crash safety."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.outbox import (
    SANE_WALL_CLOCK_NS,
    SEQ_RESERVE_BLOCK,
    LossCount,
    Outbox,
    OutboxBusy,
    OutboxSettings,
    Priority,
)

NOW = 1_750_000_000_000_000_000  # 2025-06-15
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Blob:
    """A batch whose payload starts with the sequence number it was sealed with."""

    stream: str
    sample_count: int
    size: int = 200

    def seal(self, seq: int) -> bytes:
        head = f"{seq}:".encode()
        return head + random.randbytes(max(0, self.size - len(head)))


def seq_of(payload: bytes) -> int:
    return int(payload.split(b":", 1)[0])


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def settings(tmp_path: Path, **kw: object) -> OutboxSettings:
    kw.setdefault("drain_order", "oldest_first")  # tests of order name it; others want it plain
    return OutboxSettings(path=tmp_path / "state" / "outbox.sqlite", **kw)  # type: ignore[arg-type]


def tele(n: int = 1, samples: int = 10, size: int = 200) -> list[tuple[Priority, Blob]]:
    return [(Priority.TELEMETRY, Blob("telemetry", samples, size)) for _ in range(n)]


def test_commit_pending_ack(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path), clock=Clock()) as ob:
        seqs = ob.commit(tele(3))
        assert seqs == [1, 2, 3]
        pending = ob.pending(10)
        assert [b.seq for b in pending] == seqs
        assert all(seq_of(b.payload) == b.seq for b in pending)
        assert pending[0].stream == "telemetry" and pending[0].sample_count == 10
        assert [b.seq for b in ob.pending(10, exclude={1, 3})] == [2]
        assert ob.ack(2) is True
        assert ob.ack(2) is False  # a duplicate PUBACK is harmless
        assert [b.seq for b in ob.pending(10)] == [1, 3]
        assert ob.ack_many([1, 3, 99]) == 2
        assert ob.pending(10) == []


def test_files_are_private(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s) as ob:
        ob.commit(tele(1))
        for path in (s.path, Path(f"{s.path}-wal"), ob.sidecar_path, ob.lock_path):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(s.path.parent.stat().st_mode) == 0o700


def test_existing_world_readable_db_is_tightened(tmp_path: Path) -> None:
    s = settings(tmp_path)
    Outbox(s).close()
    os.chmod(s.path, 0o644)
    Outbox(s).close()
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o600


def test_second_process_cannot_open_the_same_outbox(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s), pytest.raises(OutboxBusy):
        Outbox(s)


def test_sequence_numbers_survive_restart_and_are_never_reused(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s) as ob:
        first = ob.commit(tele(5))
        ob.ack_many(first)  # the table is empty now: nothing for SQLite to reuse from
    with Outbox(s) as ob:
        second = ob.commit(tele(2))
    assert second == [6, 7]


def test_sequence_continues_when_database_is_lost(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s) as ob:
        last = ob.commit(tele(3))[-1]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{s.path}{suffix}").unlink(missing_ok=True)
    with Outbox(s) as ob:
        assert ob.commit(tele(1))[0] > last


def test_sequence_continues_when_sidecar_is_lost(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s) as ob:
        last = ob.commit(tele(3))[-1]
        sidecar = ob.sidecar_path
    sidecar.unlink()
    with Outbox(s) as ob:
        assert ob.commit(tele(1)) == [last + 1]
    assert sidecar.exists()


def test_normal_synchronous_skips_above_reserved_block_on_restart(tmp_path: Path) -> None:
    s = settings(tmp_path, synchronous="normal")
    with Outbox(s) as ob:
        last = ob.commit(tele(2))[-1]
    with Outbox(s) as ob:
        # commits could have been lost on power loss after being published
        assert ob.commit(tele(1))[0] == last + SEQ_RESERVE_BLOCK + 1


def test_garbage_database_is_moved_aside_and_numbering_continues(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s) as ob:
        last = ob.commit(tele(4))[-1]
    s.path.write_bytes(b"this is not a database" * 400)
    with Outbox(s) as ob:
        assert ob.recovery is not None
        assert ob.recovery.moved_to.read_bytes().startswith(b"this is not a database")
        assert ob.pending(10) == []
        assert ob.commit(tele(1))[0] > last
        assert ob.loss_report().databases_replaced == 1


def _corrupt_batches_table(path: Path) -> None:
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='batches'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def test_corrupt_database_with_lost_sidecar_still_never_reuses(tmp_path: Path) -> None:
    s = settings(tmp_path)
    with Outbox(s) as ob:
        last = ob.commit(tele(30, size=3000))[-1]
        sidecar = ob.sidecar_path
    sidecar.unlink()
    _corrupt_batches_table(s.path)
    with Outbox(s) as ob:
        assert ob.recovery is not None and ob.recovery.problem
        assert ob.recovery.moved_to.exists()  # kept for inspection, never deleted
        assert ob.commit(tele(1))[0] > last  # counter salvaged from the damaged file
    with Outbox(s) as ob:
        assert ob.recovery is None


def test_pending_order_priority_and_interleaving(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as ob:
        bulk = ob.commit([(Priority.BULK, Blob("bulk", 1))])
        t = ob.commit(tele(6))
        ev = ob.commit([(Priority.EVENT, Blob("events", 5)), (Priority.EVENT, Blob("events", 5))])
        seqs = lambda order: [b.seq for b in ob.pending(20, order=order)]  # noqa: E731
        assert seqs("oldest_first") == ev + t + bulk
        assert seqs("newest_first") == ev[::-1] + t[::-1] + bulk
        assert seqs("interleaved") == [ev[1], ev[0], t[5], t[0], t[4], t[1], t[3], t[2], *bulk]
        assert [b.seq for b in ob.pending(3, order="interleaved", exclude={ev[1], t[5]})] == [
            ev[0], t[4], t[0]]
        assert [b.seq for b in ob.pending(2)] == ev  # default drain order: oldest first


def test_configured_drain_order_is_the_default(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path, drain_order="newest_first")) as ob:
        seqs = ob.commit(tele(3))
        assert [b.seq for b in ob.pending(3)] == seqs[::-1]


def test_eviction_lowest_class_oldest_first_with_counts(tmp_path: Path) -> None:
    s = settings(tmp_path, max_bytes=1024 * 1024, max_payload_bytes=16_384)
    with Outbox(s, clock=Clock()) as ob:
        events = ob.commit([(Priority.EVENT, Blob("events", 7, 8000)) for _ in range(10)])
        bulk = ob.commit([(Priority.BULK, Blob("bulk", 3, 8000)) for _ in range(20)])
        telemetry: list[int] = []
        for _ in range(250):
            telemetry += ob.commit(tele(1, samples=11, size=8000))
            assert ob.stats().used_bytes <= s.max_bytes
        stored = {b.seq for b in ob.pending(1000)}
        assert set(events) <= stored  # highest class untouched
        assert not set(bulk) & stored  # lowest class went first
        survivors = [seq for seq in telemetry if seq in stored]
        assert survivors == telemetry[-len(survivors):]  # oldest telemetry went next
        evicted_tele = len(telemetry) - len(survivors)
        assert evicted_tele > 0
        report = ob.loss_report()
        assert set(report.losses) == {
            LossCount(Priority.BULK, "evicted", 20, 60),
            LossCount(Priority.TELEMETRY, "evicted", evicted_tele, 11 * evicted_tele)}
        assert s.path.stat().st_size <= s.max_bytes + 16 * 8192


def test_loss_counters_persist_until_acknowledged(tmp_path: Path) -> None:
    s = settings(tmp_path, max_bytes=1024 * 1024, max_payload_bytes=16_384)
    with Outbox(s) as ob:
        for _ in range(200):
            ob.commit(tele(1, samples=2, size=8000))
        report = ob.loss_report()
        assert not report.empty
    with Outbox(s) as ob:
        assert ob.loss_report() == report  # survived the restart
        for _ in range(10):  # more evictions between sending the report and its PUBACK
            ob.commit(tele(1, samples=2, size=8000))
        ob.ack_loss_report(report)
        after = ob.loss_report()
        (left,) = after.losses
        assert left.batches == 10 and left.samples == 20
        assert ob.stats().lost_total["telemetry.evicted"]["batches"] == report.losses[0].batches + 10
        ob.ack_loss_report(after)
        assert ob.loss_report().empty


def test_losses_passed_with_a_commit_are_counted(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as ob:
        ob.commit(tele(1), [LossCount(Priority.EVENT, "rejected", 0, 600)])
        assert ob.loss_report().to_dict() == {
            "losses": {"event": {"rejected": {"batches": 0, "samples": 600}}},
            "databases_replaced": 0}


def test_ttl_expiry_per_class(tmp_path: Path) -> None:
    clock = Clock()
    s = settings(tmp_path, ttl_seconds={"event": 100, "telemetry": 10, "bulk": 5})
    with Outbox(s, clock=clock) as ob:
        ev = ob.commit([(Priority.EVENT, Blob("events", 4))])
        ob.commit(tele(2, samples=6))
        clock.now += 11 * 10**9
        assert [b.seq for b in ob.pending(10)] == ev
        assert ob.loss_report().losses == (LossCount(Priority.TELEMETRY, "expired", 2, 12),)
        clock.now += 100 * 10**9
        assert ob.expire() == 1
        assert ob.pending(10) == []


def test_ttl_counts_from_clock_sync_for_batches_stored_before_it(tmp_path: Path) -> None:
    clock = Clock(now=5 * 10**9)  # wall clock not set yet (1970)
    s = settings(tmp_path, ttl_seconds={"telemetry": 10})
    with Outbox(s, clock=clock) as ob:
        seqs = ob.commit(tele(2))
        assert ob.expire() == 0
        clock.now = SANE_WALL_CLOCK_NS + 10**18  # clock synchronised
        assert ob.expire() == 0  # not judged by a 1970 timestamp
        clock.now += 5 * 10**9
        assert [b.seq for b in ob.pending(10)] == seqs
        clock.now += 6 * 10**9
        assert ob.expire() == 2


def test_oversized_payload_is_refused_and_consumes_nothing(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path, max_payload_bytes=4096, max_bytes=1024 * 1024)) as ob:
        with pytest.raises(ValueError, match="max_payload_bytes"):
            ob.commit(tele(1) + tele(1, size=5000))
        assert ob.pending(10) == []
        assert ob.commit(tele(1)) == [1]


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError):
        OutboxSettings(path=Path("x"), unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        OutboxSettings(path=Path("x"), max_bytes=1024 * 1024, max_payload_bytes=262_144)
    with pytest.raises(ValidationError):
        OutboxSettings(path=Path("x"), synchronous="off")  # type: ignore[arg-type]
    s = OutboxSettings(path=Path("x"))
    assert (s.max_bytes, s.synchronous, s.max_payload_bytes, s.flush_interval_ms,
            s.drain_order) == (64 * 1024 * 1024, "full", 131_072, 1000, "interleaved")


CHILD = textwrap.dedent(r"""
    import os, random, sys
    import structlog
    from agent.outbox import Outbox, OutboxSettings, Priority

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))

    def say(*words):  # one write(2) of a short line to a pipe is atomic
        os.write(1, (" ".join(map(str, words)) + "\n").encode())

    class Blob:
        stream = "telemetry"
        sample_count = 3
        def __init__(self, size):
            self.size = size
        def seal(self, seq):
            return f"{seq}:".encode() + random.randbytes(self.size)

    ob = Outbox(OutboxSettings(path=sys.argv[1]))
    say("READY")
    while True:
        batches = [(Priority.TELEMETRY, Blob(random.randint(10, 20000)))
                   for _ in range(random.randint(1, 4))]
        seqs = ob.commit(batches)
        say("C", *seqs)
        if random.random() < 0.3:
            for b in ob.pending(2):
                say("a", b.seq)  # ack started: may or may not be done
                ob.ack(b.seq)
                say("A", b.seq)
""")


def test_kill_9_never_loses_committed_batches_or_corrupts(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rnd = random.Random(20241121)
    committed: list[int] = []
    acked: set[int] = set()
    ack_started: set[int] = set()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_no in range(20):
        child = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=env)
        assert child.stdout is not None
        lines: list[str] = []
        if round_no % 5 == 4:  # sometimes during start-up (open, recovery, checks)
            time.sleep(rnd.uniform(0.0, 0.3))
        else:
            assert child.stdout.readline().strip() == "READY"
            lines += [child.stdout.readline() for _ in range(rnd.randint(1, 40))]
            time.sleep(rnd.uniform(0.0, 0.02))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()  # whatever the child printed before it died
        assert child.returncode == -signal.SIGKILL
        lines += [line + "\n" for line in out.split("\n")[:-1]]
        for line in lines:
            assert line.endswith("\n"), f"torn line {line!r}"
            kind, *nums = line.split()
            if kind == "C":
                committed.extend(map(int, nums))
            elif kind == "A":
                acked.add(int(nums[0]))
            elif kind == "a":
                ack_started.add(int(nums[0]))
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {r[0] for r in conn.execute("SELECT seq FROM batches")}
        conn.close()
        missing = set(committed) - ack_started - stored
        assert not missing, f"round {round_no}: committed batches lost: {sorted(missing)[:10]}"
        assert not acked & stored, f"round {round_no}: an acknowledged batch came back"
    assert committed == sorted(set(committed)), "a sequence number was handed out twice"
    assert len(committed) > 20
    with Outbox(OutboxSettings(path=db)) as ob:
        assert ob.recovery is None
        assert ob.commit(tele(1))[0] > committed[-1]
