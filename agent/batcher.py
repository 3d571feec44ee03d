"""The pipeline's sink into the outbox: buffer records briefly, commit them in batches.

:class:`OutboxSink` keeps emitted records in memory for at most one flush interval,
then encodes them (:mod:`agent.wire`) and stores every resulting batch in ONE outbox
transaction, so the disk sees about one commit per interval however busy the bus is.
Events go to priority class ``event``, samples and aggregates to ``telemetry``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from agent.outbox import LossCause, LossCount, Outbox, OutboxUnavailable, Priority
from agent.records import Record
from agent.wire import (
    EncodedBatch,
    RecordRejected,
    encode_records,
    samples_in,
    stream_of,
    zstd_available,
)

log = structlog.get_logger(__name__)

PRIORITY_OF_STREAM: Final[dict[str, Priority]] = {
    "events": Priority.EVENT, "telemetry": Priority.TELEMETRY}
DEFAULT_MAX_BUFFERED_RECORDS: Final = 200_000
DEFAULT_MAX_RETAINED_BYTES: Final = 16 * 1024 * 1024
EARLY_FLUSH_RECORDS: Final = 50_000  # wake the flush thread before the interval ends


def new_boot_id() -> str:
    """A fresh random id for this run of the agent (32 hex characters)."""
    return uuid.uuid4().hex


@dataclass
class SinkStats:
    records_in: int = 0
    records_dropped: int = 0
    commits: int = 0
    batches_committed: int = 0
    commit_failures: int = 0
    last_seq: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)


def _priority(record: Record) -> Priority:
    return PRIORITY_OF_STREAM[stream_of(record)]


def _values(record: Record) -> int:
    """Values a lost record carried, at least one so that every loss shows."""
    return max(1, samples_in(record))


class OutboxSink:
    """Sink that batches records into the outbox; ``emit`` is thread-safe and never blocks
    on the disk.

    With ``start_thread`` a daemon thread flushes every ``flush_interval_ms`` of the
    outbox settings; without it the owner calls :meth:`flush`. :meth:`close` stops the
    thread and flushes what is left (it does not close the outbox, which its owner does).
    If the outbox fails, encoded batches are kept and retried on the next flush, up to
    ``max_retained_bytes``; beyond that the oldest are dropped and counted as ``dropped``.
    """

    def __init__(self, outbox: Outbox, *, vehicle_id: str, boot_id: str,
                 start_thread: bool = True,
                 max_buffered_records: int = DEFAULT_MAX_BUFFERED_RECORDS,
                 max_retained_bytes: int = DEFAULT_MAX_RETAINED_BYTES) -> None:
        self.outbox = outbox
        self.vehicle_id = vehicle_id
        self.boot_id = boot_id
        self.settings = outbox.settings
        self.max_buffered_records = max_buffered_records
        self.max_retained_bytes = max_retained_bytes
        self.stats = SinkStats()
        self._buffer: list[Record] = []
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._retained: list[tuple[Priority, EncodedBatch]] = []
        self._losses: dict[tuple[Priority, LossCause], list[int]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        if self.settings.compression == "zstd" and not zstd_available():
            log.warning("zstd_unavailable", fallback="zlib",
                        hint="install the zstandard package for smaller batches")
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="outbox-flush", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ Sink protocol

    def emit(self, records: list[Record]) -> None:
        if not records:
            return
        with self._buffer_lock:
            if self._closed:
                raise RuntimeError("emit() after close()")
            room = self.max_buffered_records - len(self._buffer)
            accepted = records if room >= len(records) else records[:max(room, 0)]
            self._buffer.extend(accepted)
            self.stats.records_in += len(records)
            dropped = records[len(accepted):]
            if dropped:
                self.stats.records_dropped += len(dropped)
                for record in dropped:
                    self._note_loss(_priority(record), "dropped", 0, _values(record))
            early = len(self._buffer) >= EARLY_FLUSH_RECORDS
        if dropped:
            log.warning("sink_buffer_full", dropped=len(dropped),
                        max_buffered_records=self.max_buffered_records)
        if early:
            self._wake.set()

    def close(self) -> None:
        with self._buffer_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    # ------------------------------------------------------------------ flushing

    def flush(self) -> list[int]:
        """Encode what is buffered and commit it in one transaction; return the seqs.

        Returns ``[]`` when there was nothing to store or the outbox failed (the batches
        are kept for the next flush).
        """
        with self._flush_lock:
            with self._buffer_lock:
                records, self._buffer = self._buffer, []
            if records:
                try:
                    self._encode(records)
                except Exception:  # an encoder bug must not lose records uncounted
                    log.exception("sink_encode_failed", records=len(records))
                    with self._buffer_lock:
                        for record in records:
                            self._note_loss(_priority(record), "dropped", 0, _values(record))
            with self._buffer_lock:
                losses = [LossCount(p, cause, b, s)
                          for (p, cause), (b, s) in self._losses.items()]
            if not self._retained and not losses:
                return []
            try:
                seqs = self.outbox.commit(self._retained, losses)
            except OutboxUnavailable as exc:
                self.stats.commit_failures += 1
                log.error("outbox_commit_failed", error=str(exc),
                          retained_batches=len(self._retained))
                self._trim_retained()
                return []
            with self._buffer_lock:
                for loss in losses:  # counted now; keep what arrived since
                    left = self._losses[(loss.priority, loss.cause)]
                    left[0] -= loss.batches
                    left[1] -= loss.samples
                    if left == [0, 0]:
                        del self._losses[(loss.priority, loss.cause)]
            self._retained = []
            self.stats.commits += 1
            self.stats.batches_committed += len(seqs)
            if seqs:
                self.stats.last_seq = seqs[-1]
            return seqs

    def _encode(self, records: Sequence[Record]) -> None:
        result = encode_records(records, vehicle_id=self.vehicle_id, boot_id=self.boot_id,
                                compression=self.settings.compression,
                                max_payload_bytes=self.settings.max_payload_bytes)
        self._retained.extend((PRIORITY_OF_STREAM[b.stream], b) for b in result.batches)
        for rejection in result.rejected:
            self._reject(rejection)

    def _reject(self, rejection: RecordRejected) -> None:
        self.stats.rejected[rejection.reason] = self.stats.rejected.get(rejection.reason, 0) + 1
        with self._buffer_lock:
            self._note_loss(_priority(rejection.record), "rejected", 0,
                            _values(rejection.record))
        log.error("record_rejected", reason=rejection.reason, detail=rejection.detail,
                  record_type=type(rejection.record).__name__)

    def _note_loss(self, priority: Priority, cause: LossCause, count: int,
                   samples: int) -> None:
        """Count a loss to be stored with the next commit (caller holds the buffer lock)."""
        totals = self._losses.setdefault((priority, cause), [0, 0])
        totals[0] += count
        totals[1] += samples

    def _trim_retained(self) -> None:
        size = sum(len(b.body) for _, b in self._retained)
        while self._retained and size > self.max_retained_bytes:
            priority, batch = self._retained.pop(0)
            size -= len(batch.body)
            with self._buffer_lock:
                self._note_loss(priority, "dropped", 1, batch.sample_count)
            log.error("batch_dropped", reason="outbox unavailable and memory cap reached",
                      samples=batch.sample_count, stream=batch.stream)

    def _run(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception:  # the flush thread must outlive any one bad flush
                log.exception("sink_flush_failed")
