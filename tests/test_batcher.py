"""OutboxSink: records in, a few outbox commits out, nothing lost without being counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.batcher import OutboxSink, new_boot_id
from agent.outbox import (
    LossCount,
    Outbox,
    OutboxSettings,
    OutboxUnavailable,
    Priority,
    SealableBatch,
)
from agent.records import Aggregate, Event, Record, Sample
from agent.wire import decode_batch

VEHICLE = "VIN0000000000TEST"
T0 = 1_750_000_000_000_000_000


class CountingOutbox(Outbox):
    """A real outbox that remembers each commit() call (to see transactions)."""

    def __init__(self, *args: object, fail_first: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commit_calls: list[int] = []
        self.fail_first = fail_first

    def commit(self, batches: Sequence[tuple[Priority, SealableBatch]],
               losses: Sequence[LossCount] = ()) -> list[int]:
        if self.fail_first:
            self.fail_first -= 1
            raise OutboxUnavailable("disk I/O error (simulated)")
        seqs = super().commit(batches, losses)
        self.commit_calls.append(len(seqs))
        return seqs


def make_outbox(tmp_path: Path, **kw: object) -> CountingOutbox:
    fail_first = int(kw.pop("fail_first", 0))  # type: ignore[call-overload]
    kw.setdefault("drain_order", "oldest_first")  # tests read stored batches back in commit order
    settings = OutboxSettings(path=tmp_path / "outbox.sqlite", **kw)  # type: ignore[arg-type]
    return CountingOutbox(settings, fail_first=fail_first)


def stored_records(outbox: Outbox) -> tuple[list[Record], list[tuple[int, str, Priority]]]:
    records: list[Record] = []
    meta = []
    for batch in outbox.pending(10_000):
        decoded = decode_batch(batch.payload)
        assert decoded.seq == batch.seq and decoded.vehicle_id == VEHICLE
        records.extend(decoded.records)
        meta.append((batch.seq, decoded.stream, batch.priority))
    return records, meta


def samples(signal: str, n: int, start: int = 0) -> list[Record]:
    return [Sample(signal, T0 + (start + i) * 1_000_000, float(start + i), "r", True)
            for i in range(n)]


def test_flush_commits_everything_in_one_transaction(tmp_path: Path) -> None:
    with make_outbox(tmp_path) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id=new_boot_id(), start_thread=False)
        event = Event("brake", T0, "a < -6", tuple(samples("a", 3)), True)  # type: ignore[arg-type]
        agg = Aggregate("speed", "agg", T0, T0 + 10**9, {"mean": 1.5}, True)
        unsynced = Sample("speed", T0, 2.0, "r", False)
        sink.emit(samples("speed", 500))
        sink.emit([event, agg, unsynced])
        seqs = sink.flush()
        assert outbox.commit_calls == [3]  # telemetry synced + unsynced + events: one commit
        assert seqs == sorted(seqs) and len(seqs) == 3
        records, meta = stored_records(outbox)
        assert {(stream, priority) for _, stream, priority in meta} == {
            ("events", Priority.EVENT), ("telemetry", Priority.TELEMETRY)}
        assert meta[0][1] == "events"  # sent first
        assert len(records) == 503
        assert event in records and agg in records and unsynced in records
        assert sink.flush() == []  # nothing buffered: no empty commit
        assert outbox.commit_calls == [3]
        sink.close()


def test_close_flushes_what_is_left(tmp_path: Path) -> None:
    with make_outbox(tmp_path) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1", start_thread=False)
        sink.emit(samples("s", 10))
        sink.close()
        sink.close()  # idempotent
        assert len(stored_records(outbox)[0]) == 10
        with pytest.raises(RuntimeError):
            sink.emit(samples("s", 1))


def test_flush_thread_commits_without_being_asked(tmp_path: Path) -> None:
    with make_outbox(tmp_path, flush_interval_ms=20) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1")
        sink.emit(samples("s", 10))
        deadline = time.monotonic() + 30
        while not outbox.pending(1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(stored_records(outbox)[0]) == 10
        sink.close()


def test_concurrent_emitters_lose_nothing_and_keep_order(tmp_path: Path) -> None:
    with make_outbox(tmp_path, flush_interval_ms=10) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1")
        per_thread = 3000

        def produce(k: int) -> None:
            for start in range(0, per_thread, 50):
                sink.emit(samples(f"sig{k}", 50, start))

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sink.close()
        records, _ = stored_records(outbox)
        assert len(records) == 4 * per_thread
        for k in range(4):
            got = [r for r in records if isinstance(r, Sample) and r.signal == f"sig{k}"]
            assert got == samples(f"sig{k}", per_thread)
        assert sink.stats.records_in == 4 * per_thread and sink.stats.records_dropped == 0


def test_rejected_records_are_counted_upstream(tmp_path: Path) -> None:
    with make_outbox(tmp_path, max_payload_bytes=4096, max_bytes=1024 * 1024) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1", start_thread=False)
        huge = Event("crash", T0, "x", tuple(samples("one_signal", 2000)), True)  # type: ignore[arg-type]
        bad = Sample("s", -5, 1.0, "r", True)
        sink.emit([huge, bad, *samples("ok", 3)])
        sink.flush()
        assert sink.stats.rejected == {"event_too_large": 1, "invalid_record": 1}
        report = outbox.loss_report()
        assert set(report.losses) == {LossCount(Priority.EVENT, "rejected", 0, 2000),
                                      LossCount(Priority.TELEMETRY, "rejected", 0, 1)}
        assert len(stored_records(outbox)[0]) == 3
        sink.close()


def test_outbox_failure_keeps_batches_for_retry(tmp_path: Path) -> None:
    with make_outbox(tmp_path, fail_first=2) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1", start_thread=False)
        sink.emit(samples("a", 5))
        assert sink.flush() == []
        sink.emit(samples("b", 5))
        assert sink.flush() == []
        assert sink.stats.commit_failures == 2
        assert len(sink.flush()) == 2
        assert len(stored_records(outbox)[0]) == 10
        assert outbox.loss_report().empty
        sink.close()


def test_retained_batches_beyond_the_memory_cap_are_dropped_and_counted(tmp_path: Path) -> None:
    with make_outbox(tmp_path, fail_first=3) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1", start_thread=False,
                          max_retained_bytes=1)
        for name in ("a", "b", "c"):
            sink.emit(samples(name, 5))
            sink.flush()
        sink.emit(samples("d", 5))
        sink.flush()
        records, _ = stored_records(outbox)
        assert {r.signal for r in records if isinstance(r, Sample)} == {"d"}
        assert outbox.loss_report().losses == (
            LossCount(Priority.TELEMETRY, "dropped", 3, 15),)
        sink.close()


def test_full_buffer_drops_new_records_and_counts_them(tmp_path: Path) -> None:
    with make_outbox(tmp_path) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1", start_thread=False,
                          max_buffered_records=10)
        event = Event("e", T0, "c", tuple(samples("x", 4)), True)  # type: ignore[arg-type]
        sink.emit(samples("s", 12))
        sink.emit([event])
        sink.flush()
        assert sink.stats.records_dropped == 3
        assert len(stored_records(outbox)[0]) == 10
        assert set(outbox.loss_report().losses) == {
            LossCount(Priority.TELEMETRY, "dropped", 0, 2),
            LossCount(Priority.EVENT, "dropped", 0, 4)}
        sink.close()


def test_encoder_failure_is_counted_not_silent(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.batcher

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("encoder bug")

    with make_outbox(tmp_path) as outbox:
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id="boot1", start_thread=False)
        sink.emit(samples("s", 4))
        monkeypatch.setattr(agent.batcher, "encode_records", broken)
        assert sink.flush() == []
        monkeypatch.undo()
        sink.emit(samples("t", 1))
        sink.flush()
        assert outbox.loss_report().losses == (LossCount(Priority.TELEMETRY, "dropped", 0, 4),)
        sink.close()
