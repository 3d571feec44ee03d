"""The cloud side in miniature: receive, decode and account for what the fleet uploads.

Two layers, in the usual split:

* :class:`FleetLedger` is pure logic (no I/O, not thread-safe): it is fed ``(topic,
  payload, retained)`` and keeps per-vehicle accounting -- the sequence numbers received
  (as ranges), duplicates (counted, never double-counted in the records), gaps (numbers
  between the lowest and highest received that have not arrived *yet*: batches arrive out
  of order because the agent interleaves backlog and live data), boots, record counts,
  split events reassembled, rejected payloads with their reason, and the latest status
  with the loss reports it carried.
* :class:`BackendMonitor` is the MQTT adapter: its own mutual-TLS identity (client id =
  certificate CN), MQTT v5, QoS 1 subscriptions to ``{prefix}/+/telemetry``, ``events``
  and ``status``, reconnect with backoff, a persistent session so batches the broker
  accepted while the monitor was away are delivered when it comes back. It wraps a
  ledger behind a lock and offers thread-safe accessors and ``wait_for`` for tests.

``telematics-sim backend`` (:mod:`simulator.commands.backend`) is the terminal front end.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import ssl
import threading
import time
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.commands.results import RESULTS_STREAM, CommandResult, ResultRejected, decode_result
from agent.errors import ConfigError
from agent.pki import check_private_key_file, common_name, load_certificate
from agent.records import Event, Record
from agent.sinks import record_to_json
from agent.uplink.mqtt import (
    DATA_STREAMS,
    QOS,
    STABLE_SESSION_S,
    STATUS,
    ConnectFailure,
    MqttSettings,
    backoff_delay,
    build_tls_context,
    check_tls_context,
    classify_connect_error,
    classify_lost_before_connack,
)
from agent.wire import BatchRejected, DecodedBatch, EventPart, decode_batch, merge_event_parts

log = structlog.get_logger(__name__)

MAX_STATUS_BYTES = 64 * 1024  # a status is a small JSON object; anything bigger is refused
STATUS_STATES = ("online", "offline")
RECENT_REJECTIONS = 50  # how many rejections the snapshot lists in full
DIGESTS_KEPT = 100_000  # payload digests kept per vehicle to tell a true duplicate from a conflict
PENDING_EVENTS_KEPT = 1024  # split events waiting for parts, per vehicle
SIGNALS_KEPT = 10_000  # distinct signals whose latest value is kept, per vehicle
POLL_S = 0.1


# --------------------------------------------------------------------------- sequence numbers


class SeqSet:
    """A set of sequence numbers kept as sorted, disjoint, inclusive ranges.

    Received numbers are nearly contiguous, so this stays a handful of ranges however
    many batches arrive, and gaps fall out of it directly.
    """

    def __init__(self, seqs: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0
        for seq in seqs:
            self.add(seq)

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield from range(start, end + 1)

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there."""
        i = bisect_right(self._starts, seq) - 1
        if i >= 0 and seq <= self._ends[i]:
            return False
        joins_left = i >= 0 and self._ends[i] == seq - 1
        joins_right = i + 1 < len(self._starts) and self._starts[i + 1] == seq + 1
        if joins_left and joins_right:
            self._ends[i] = self._ends[i + 1]
            del self._starts[i + 1], self._ends[i + 1]
        elif joins_left:
            self._ends[i] = seq
        elif joins_right:
            self._starts[i + 1] = seq
        else:
            self._starts.insert(i + 1, seq)
            self._ends.insert(i + 1, seq)
        self._count += 1
        return True

    @property
    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    @property
    def last(self) -> int | None:
        return self._ends[-1] if self._ends else None

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def gaps(self) -> list[tuple[int, int]]:
        """Inclusive ranges of numbers between the lowest and highest that are absent."""
        return [(self._ends[k] + 1, self._starts[k + 1] - 1) for k in range(len(self._starts) - 1)]


def count_in(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(end - start + 1 for start, end in ranges)


def expand(ranges: Iterable[tuple[int, int]], limit: int) -> list[int]:
    """The numbers in ``ranges``, at most ``limit`` of them (a bogus seq may open a huge gap)."""
    out: list[int] = []
    for start, end in ranges:
        out.extend(range(start, min(end, start + limit - len(out) - 1) + 1))
        if len(out) >= limit:
            break
    return out


def format_ranges(ranges: Iterable[tuple[int, int]], limit: int = 8) -> str:
    items = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- what arrives


@dataclass(frozen=True)
class Delivered:
    """A complete record and the batch(es) that carried it (several for a split event)."""

    record: Record
    seq: int
    part_seqs: tuple[int, ...] = ()

    def to_json(self, vehicle_id: str) -> dict[str, Any]:
        """``agent.sinks.record_to_json`` plus ``vehicle_id`` and ``seq`` (and ``part_seqs``)."""
        out = {**record_to_json(self.record), "vehicle_id": vehicle_id, "seq": self.seq}
        if self.part_seqs:
            out["part_seqs"] = list(self.part_seqs)
        return out


@dataclass(frozen=True)
class BatchArrival:
    """One decoded batch, as handed to ``on_batch``.

    ``delivered`` is empty for a duplicate; it holds the records this batch completed (its
    samples, aggregates and whole events, plus split events whose last part this was).
    """

    vehicle_id: str
    topic: str
    batch: DecodedBatch
    received_at: float
    duplicate: bool
    conflict: bool  # a duplicate seq whose payload differs from the first one: an agent bug
    backlog: bool  # a higher seq of this vehicle had already arrived
    gap_opened: tuple[int, int] | None  # numbers this batch showed to be missing (so far)
    gap_filled: bool  # this batch was one of the missing numbers
    missing_now: int  # how many numbers of this vehicle are missing after this batch
    delivered: tuple[Delivered, ...]

    @property
    def seq(self) -> int:
        return self.batch.seq

    @property
    def records(self) -> list[Record]:
        return [d.record for d in self.delivered]


@dataclass(frozen=True)
class StatusArrival:
    """A status message: ``status`` is the parsed JSON object (None: the retained status was
    cleared); ``losses`` what this message added to the reported losses (None: nothing)."""

    vehicle_id: str
    topic: str
    status: dict[str, Any] | None
    retained: bool
    received_at: float
    losses: dict[str, dict[str, dict[str, int]]] | None


@dataclass(frozen=True)
class Rejection:
    """A payload that was refused; ``reason`` is stable (``bad_cbor``, ``vehicle_mismatch``...)."""

    vehicle_id: str | None
    topic: str
    reason: str
    detail: str
    size: int
    received_at: float

    def to_json(self) -> dict[str, Any]:
        return {"vehicle_id": self.vehicle_id, "topic": self.topic, "reason": self.reason,
                "detail": self.detail, "size": self.size, "received_at": self.received_at}


@dataclass(frozen=True)
class ResultArrival:
    """A command result (``{prefix}/{vehicle}/cmd/res``); it uses a sequence number too."""

    vehicle_id: str
    topic: str
    result: CommandResult
    seq: int
    duplicate: bool
    received_at: float


Arrival = BatchArrival | StatusArrival | ResultArrival | Rejection


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class BootSnapshot:
    boot_id: str
    batches: int
    first_seq: int
    last_seq: int
    first_seen: float

    def to_json(self) -> dict[str, Any]:
        return {"boot_id": self.boot_id, "batches": self.batches, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "first_seen": self.first_seen}


@dataclass(frozen=True)
class VehicleSnapshot:
    """Accounting of one vehicle at one moment. Counts are of unique batches/records."""

    vehicle_id: str
    batches: int
    messages: int  # batch messages received, duplicates included
    duplicates: int
    duplicate_seqs: tuple[int, ...]  # one entry per duplicate arrival, in arrival order
    seq_conflicts: tuple[int, ...]
    first_seq: int | None
    last_seq: int | None
    missing_ranges: tuple[tuple[int, int], ...]
    missing_at_boot_changes: tuple[tuple[int, int], ...]  # gaps between two boots' numbers
    streams: dict[str, int]
    samples: int
    aggregates: int
    events: int  # whole events (split ones once all parts arrived)
    event_samples: int
    event_parts: int  # parts of split events received
    incomplete_events: int  # split events still waiting for parts
    rejected: dict[str, int]
    boots: tuple[BootSnapshot, ...]
    status: dict[str, Any] | None
    status_updates: int
    reported_losses: dict[str, dict[str, dict[str, int]]]
    databases_replaced: int
    last_batch_at: float | None

    @property
    def missing(self) -> int:
        return count_in(self.missing_ranges)

    @property
    def state(self) -> str:
        if self.status is None:
            return "unknown"
        return str(self.status.get("state", "unknown"))

    def to_json(self) -> dict[str, Any]:
        return {
            "vehicle_id": self.vehicle_id, "batches": self.batches, "messages": self.messages,
            "duplicates": self.duplicates, "duplicate_seqs": list(self.duplicate_seqs),
            "seq_conflicts": list(self.seq_conflicts),
            "first_seq": self.first_seq, "last_seq": self.last_seq,
            "missing": self.missing, "missing_ranges": [list(r) for r in self.missing_ranges],
            "missing_at_boot_changes": [list(r) for r in self.missing_at_boot_changes],
            "streams": dict(self.streams), "samples": self.samples, "aggregates": self.aggregates,
            "events": self.events, "event_samples": self.event_samples,
            "event_parts": self.event_parts, "incomplete_events": self.incomplete_events,
            "rejected": dict(self.rejected), "boots": [b.to_json() for b in self.boots],
            "status": self.status, "status_updates": self.status_updates,
            "reported_losses": self.reported_losses,
            "databases_replaced": self.databases_replaced, "last_batch_at": self.last_batch_at,
        }


@dataclass(frozen=True)
class ConnectionStats:
    connected: bool
    subscribed: bool
    connects: int
    connect_failures: dict[str, int]
    disconnects: dict[str, int]
    last_failure: ConnectFailure | None

    def to_json(self) -> dict[str, Any]:
        last = self.last_failure
        return {"connected": self.connected, "subscribed": self.subscribed,
                "connects": self.connects, "connect_failures": dict(self.connect_failures),
                "disconnects": dict(self.disconnects),
                "last_failure": None if last is None else {"cause": last.cause, "detail": last.detail}}


@dataclass(frozen=True)
class MonitorSnapshot:
    vehicles: dict[str, VehicleSnapshot]
    rejected: dict[str, int]  # all rejections by reason
    recent_rejections: tuple[Rejection, ...]
    connection: ConnectionStats | None = None

    def vehicle(self, vehicle_id: str) -> VehicleSnapshot:
        return self.vehicles[vehicle_id]

    def to_json(self) -> dict[str, Any]:
        return {
            "vehicles": {vid: v.to_json() for vid, v in sorted(self.vehicles.items())},
            "rejected": dict(self.rejected),
            "recent_rejections": [r.to_json() for r in self.recent_rejections],
            "connection": None if self.connection is None else self.connection.to_json(),
        }


# --------------------------------------------------------------------------- the ledger


@dataclass
class _Boot:
    boot_id: str
    first_seen: float
    seqs: SeqSet = field(default_factory=SeqSet)


@dataclass
class _VehicleLedger:
    vehicle_id: str
    keep_records: int | None
    seqs: SeqSet = field(default_factory=SeqSet)
    messages: int = 0
    duplicate_seqs: list[int] = field(default_factory=list)
    seq_conflicts: list[int] = field(default_factory=list)
    digests: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    streams: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    aggregates: int = 0
    events: int = 0
    event_samples: int = 0
    event_parts: int = 0
    pending_events: OrderedDict[tuple[object, ...], dict[int, tuple[int, Event]]] = field(
        default_factory=OrderedDict)
    dropped_event_parts: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    boots: dict[str, _Boot] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    status_payload: bytes | None = None
    status_updates: int = 0
    reported_losses: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    databases_replaced: int = 0
    latest: dict[str, tuple[int, Any]] = field(default_factory=dict)
    last_batch_at: float | None = None
    records: deque[Delivered] = field(init=False)

    def __post_init__(self) -> None:
        self.records = deque(maxlen=self.keep_records)

    def boot_of(self, seq: int) -> str | None:
        for boot in self.boots.values():
            if seq in boot.seqs:
                return boot.boot_id
        return None

    def boot_gaps(self) -> list[tuple[int, int]]:
        """Gaps whose neighbours belong to different boots: the agent may skip numbers on
        purpose at a restart (docs/protocol.md §6), so these may be no loss at all."""
        return [(a, b) for a, b in self.seqs.gaps() if self.boot_of(a - 1) != self.boot_of(b + 1)]

    def snapshot(self) -> VehicleSnapshot:
        boots = sorted(self.boots.values(), key=lambda b: (b.seqs.first or 0, b.first_seen))
        return VehicleSnapshot(
            vehicle_id=self.vehicle_id, batches=len(self.seqs), messages=self.messages,
            duplicates=len(self.duplicate_seqs), duplicate_seqs=tuple(self.duplicate_seqs),
            seq_conflicts=tuple(self.seq_conflicts), first_seq=self.seqs.first,
            last_seq=self.seqs.last, missing_ranges=tuple(self.seqs.gaps()),
            missing_at_boot_changes=tuple(self.boot_gaps()), streams=dict(self.streams),
            samples=self.samples, aggregates=self.aggregates, events=self.events,
            event_samples=self.event_samples, event_parts=self.event_parts,
            incomplete_events=len(self.pending_events), rejected=dict(self.rejected),
            boots=tuple(BootSnapshot(b.boot_id, len(b.seqs), b.seqs.first or 0, b.seqs.last or 0,
                                     b.first_seen) for b in boots),
            status=None if self.status is None else json.loads(json.dumps(self.status)),
            status_updates=self.status_updates,
            reported_losses=json.loads(json.dumps(self.reported_losses)),
            databases_replaced=self.databases_replaced, last_batch_at=self.last_batch_at)


def _parse_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """``{prefix}/{vehicle}/{kind}`` -> (vehicle, kind), or None for any other shape."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    vehicle, _, kind = topic[len(head):].partition("/")
    if not vehicle or kind not in (*DATA_STREAMS, STATUS):
        return None
    return vehicle, kind


def _loss_report(status: Mapping[str, Any]) -> tuple[dict[str, dict[str, dict[str, int]]], int]:
    """The ``losses`` / ``databases_replaced`` fields of a status, checked (ValueError if bad)."""
    raw = status.get("losses", {})
    if not isinstance(raw, dict):
        raise ValueError("'losses' is not an object")
    out: dict[str, dict[str, dict[str, int]]] = {}
    for cls, causes in raw.items():
        if not isinstance(causes, dict):
            raise ValueError(f"losses.{cls} is not an object")
        for cause, amounts in causes.items():
            if not isinstance(amounts, dict):
                raise ValueError(f"losses.{cls}.{cause} is not an object")
            entry: dict[str, int] = {}
            for key in ("batches", "samples"):
                value = amounts.get(key, 0)
                if type(value) is not int or value < 0:
                    raise ValueError(f"losses.{cls}.{cause}.{key} is not a count")
                entry[key] = value
            out.setdefault(str(cls), {})[str(cause)] = entry
    replaced = status.get("databases_replaced", 0)
    if type(replaced) is not int or replaced < 0:
        raise ValueError("'databases_replaced' is not a count")
    return out, replaced


class FleetLedger:
    """Per-vehicle accounting of everything received on the fleet's topics. Pure logic.

    ``keep_records`` bounds the records kept per vehicle for :meth:`records` (None: all,
    0: none -- the counts are kept either way). ``log_rejections=False`` is for callers
    that show every rejection themselves (the ``on_rejected`` callback).
    """

    def __init__(self, topic_prefix: str = "vt", *, keep_records: int | None = None,
                 log_rejections: bool = True) -> None:
        self.topic_prefix = topic_prefix
        self.keep_records = keep_records
        self.log_rejections = log_rejections
        self._vehicles: dict[str, _VehicleLedger] = {}
        self._rejected: dict[str, int] = {}
        self._recent: deque[Rejection] = deque(maxlen=RECENT_REJECTIONS)

    # -- feeding

    def ingest(self, topic: str, payload: bytes, *, retained: bool = False,
               received_at: float | None = None) -> Arrival:
        """Account for one message; never raises for bad input (it becomes a Rejection)."""
        now = time.time() if received_at is None else received_at
        where = _parse_topic(topic, self.topic_prefix)
        if where is None:
            return self.reject(None, topic, "unexpected_topic",
                                f"not {self.topic_prefix}/<vehicle>/<telemetry|events|status>",
                                payload, now)
        vehicle_id, kind = where
        if kind == STATUS:
            return self._status(vehicle_id, topic, payload, retained, now)
        if kind == RESULTS_STREAM:
            return self._result(vehicle_id, topic, payload, now)
        return self._batch(vehicle_id, kind, topic, payload, now)

    def _result(self, vehicle_id: str, topic: str, payload: bytes, now: float) -> Arrival:
        try:
            decoded = decode_result(payload)
        except ResultRejected as exc:
            return self.reject(vehicle_id, topic, exc.reason, exc.detail, payload, now)
        if decoded.vehicle_id != vehicle_id:
            return self.reject(vehicle_id, topic, "vehicle_mismatch",
                               f"result claims vehicle {decoded.vehicle_id!r:.140}", payload, now)
        v = self._vehicle(vehicle_id)
        v.messages += 1
        duplicate = decoded.seq in v.seqs
        if duplicate:
            v.duplicate_seqs.append(decoded.seq)
        else:
            v.seqs.add(decoded.seq)
            boot = v.boots.get(decoded.boot_id)
            if boot is None:
                boot = v.boots[decoded.boot_id] = _Boot(decoded.boot_id, now)
            boot.seqs.add(decoded.seq)
            v.streams[RESULTS_STREAM] = v.streams.get(RESULTS_STREAM, 0) + 1
        return ResultArrival(vehicle_id, topic, decoded.result, decoded.seq, duplicate, now)

    def _vehicle(self, vehicle_id: str) -> _VehicleLedger:
        ledger = self._vehicles.get(vehicle_id)
        if ledger is None:
            ledger = self._vehicles[vehicle_id] = _VehicleLedger(vehicle_id, self.keep_records)
        return ledger

    def reject(self, vehicle_id: str | None, topic: str, reason: str, detail: str,
               payload: bytes, now: float) -> Rejection:
        """Count a refused message (also for callers that refuse it before the ledger)."""
        rejection = Rejection(vehicle_id, topic, reason, detail, len(payload), now)
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        self._recent.append(rejection)
        if vehicle_id is not None:
            counts = self._vehicle(vehicle_id).rejected
            counts[reason] = counts.get(reason, 0) + 1
        if self.log_rejections:
            log.warning("payload rejected", topic=topic, reason=reason, detail=detail,
                        size=len(payload))
        return rejection

    def _batch(self, vehicle_id: str, kind: str, topic: str, payload: bytes,
               now: float) -> Arrival:
        try:
            batch = decode_batch(payload)
        except BatchRejected as exc:
            return self.reject(vehicle_id, topic, exc.reason, exc.detail, payload, now)
        # The topic is the authenticated identity (the broker's ACL binds it to the
        # certificate); the envelope is only what the payload claims.
        if batch.vehicle_id != vehicle_id:
            return self.reject(vehicle_id, topic, "vehicle_mismatch",
                                f"envelope says vehicle {batch.vehicle_id!r:.140} on the topic of "
                                f"{vehicle_id!r}", payload, now)
        if batch.stream != kind:
            return self.reject(vehicle_id, topic, "stream_mismatch",
                                f"a {batch.stream} batch on the {kind} topic", payload, now)
        v = self._vehicle(vehicle_id)
        v.messages += 1
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        seq = batch.seq
        if seq in v.seqs:
            v.duplicate_seqs.append(seq)
            known = v.digests.get(seq)
            conflict = known is not None and known != digest
            if conflict:
                v.seq_conflicts.append(seq)
                log.error("same seq, different payload", vehicle=vehicle_id, seq=seq)
            return BatchArrival(vehicle_id, topic, batch, now, True, conflict,
                                backlog=True, gap_opened=None, gap_filled=False,
                                missing_now=count_in(v.seqs.gaps()), delivered=())
        first, last = v.seqs.first, v.seqs.last
        gap_opened: tuple[int, int] | None = None
        if last is not None and first is not None:
            if seq > last + 1:
                gap_opened = (last + 1, seq - 1)
            elif seq < first - 1:
                gap_opened = (seq + 1, first - 1)
        gap_filled = first is not None and last is not None and first < seq < last
        backlog = last is not None and seq < last
        v.seqs.add(seq)
        v.digests[seq] = digest
        if len(v.digests) > DIGESTS_KEPT:
            v.digests.popitem(last=False)
        boot = v.boots.get(batch.boot_id)
        if boot is None:
            boot = v.boots[batch.boot_id] = _Boot(batch.boot_id, now)
        boot.seqs.add(seq)
        v.streams[batch.stream] = v.streams.get(batch.stream, 0) + 1
        v.samples += batch.counts.samples
        v.aggregates += batch.counts.aggregates
        v.event_samples += batch.counts.event_samples
        v.last_batch_at = now
        plain: list[Record] = [*batch.samples, *batch.aggregates]
        delivered = [Delivered(r, seq) for r in plain]
        for event, part in zip(batch.events, batch.event_parts, strict=True):
            if part.count == 1:
                v.events += 1
                delivered.append(Delivered(event, seq))
            else:
                v.event_parts += 1
                whole = self._add_part(v, seq, event, part)
                if whole is not None:
                    v.events += 1
                    delivered.append(whole)
        for sample in batch.samples:
            seen = v.latest.get(sample.signal)
            if (seen is None and len(v.latest) < SIGNALS_KEPT) or (
                    seen is not None and sample.ts_ns >= seen[0]):
                v.latest[sample.signal] = (sample.ts_ns, sample.value)
        if v.keep_records != 0:
            v.records.extend(delivered)
        return BatchArrival(vehicle_id, topic, batch, now, False, False, backlog, gap_opened,
                            gap_filled, count_in(v.seqs.gaps()), tuple(delivered))

    @staticmethod
    def _add_part(v: _VehicleLedger, seq: int, event: Event, part: EventPart) -> Delivered | None:
        key = (event.rule, event.trigger_ts_ns, event.condition, event.clock_synced, part.count)
        parts = v.pending_events.get(key)
        if parts is None:
            parts = v.pending_events[key] = {}
            if len(v.pending_events) > PENDING_EVENTS_KEPT:
                _, dropped = v.pending_events.popitem(last=False)
                v.dropped_event_parts += len(dropped)
        parts.setdefault(part.index, (seq, event))
        if len(parts) < part.count:
            return None
        del v.pending_events[key]
        merged = merge_event_parts((e, EventPart(i, part.count)) for i, (_, e) in parts.items())
        seqs = tuple(sorted({s for s, _ in parts.values()}))
        return Delivered(merged, seq, seqs)

    def _status(self, vehicle_id: str, topic: str, payload: bytes, retained: bool,
                now: float) -> Arrival:
        v = self._vehicle(vehicle_id)
        if not payload:  # a retained status deleted by whoever may write it
            v.status, v.status_payload = None, None
            return StatusArrival(vehicle_id, topic, None, retained, now, None)
        if len(payload) > MAX_STATUS_BYTES:
            return self.reject(vehicle_id, topic, "bad_status",
                                f"{len(payload)} bytes, more than {MAX_STATUS_BYTES}", payload, now)
        try:
            status = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return self.reject(vehicle_id, topic, "bad_status", f"not UTF-8 JSON: {exc}"[:300],
                                payload, now)
        if not isinstance(status, dict):
            return self.reject(vehicle_id, topic, "bad_status", "not a JSON object", payload, now)
        state = status.get("state")
        if state not in STATUS_STATES:
            return self.reject(vehicle_id, topic, "bad_status",
                                f"state must be one of {list(STATUS_STATES)}, got {state!r:.60}",
                                payload, now)
        claimed = status.get("vehicle_id", vehicle_id)
        if claimed != vehicle_id:
            return self.reject(vehicle_id, topic, "vehicle_mismatch",
                                f"status says vehicle {claimed!r:.140} on the topic of {vehicle_id!r}",
                                payload, now)
        try:
            losses, replaced = _loss_report(status)
        except ValueError as exc:
            return self.reject(vehicle_id, topic, "bad_status", str(exc), payload, now)
        # Loss reports are deltas (the agent clears what it reported once the broker has
        # it); the retained copy redelivered on (re)subscribe is the message already seen.
        repeat = retained and payload == v.status_payload
        added = None
        if not repeat and (losses or replaced):
            for cls, causes in losses.items():
                for cause, amounts in causes.items():
                    total = v.reported_losses.setdefault(cls, {}).setdefault(
                        cause, {"batches": 0, "samples": 0})
                    total["batches"] += amounts["batches"]
                    total["samples"] += amounts["samples"]
            v.databases_replaced += replaced
            added = losses
        v.status, v.status_payload = status, payload
        v.status_updates += 1
        return StatusArrival(vehicle_id, topic, status, retained, now, added)

    # -- reading

    def vehicles(self) -> list[str]:
        return sorted(self._vehicles)

    def snapshot(self) -> MonitorSnapshot:
        return MonitorSnapshot({vid: v.snapshot() for vid, v in self._vehicles.items()},
                               dict(self._rejected), tuple(self._recent))

    def vehicle(self, vehicle_id: str) -> _VehicleLedger | None:
        return self._vehicles.get(vehicle_id)


# --------------------------------------------------------------------------- MQTT adapter


@dataclass
class _Session:
    deadline: float
    established: bool = False
    started_at: float = 0.0
    closed: bool = False
    end: ConnectFailure | None = None
    socket_error: str | None = None
    subscribe_mid: int | None = None


ConnectionState = Literal["connected", "subscribed", "failed", "disconnected"]


@dataclass(frozen=True)
class ConnectionChange:
    """Handed to ``on_connection``: what happened, and when the next attempt is."""

    state: ConnectionState
    detail: str
    failure: ConnectFailure | None = None
    retry_in_s: float | None = None


class BackendMonitor:
    """Subscribes to the fleet's telemetry, events and status and accounts for them.

    The broker identifies clients by certificate CN (and mosquitto as configured here
    replaces the client id by it), so only one monitor per backend identity can be
    connected at a time: a second one would take over the first one's session.

    With ``session_expiry_s > 0`` (default one hour) the session outlives a disconnect,
    and the broker queues QoS 1 messages for the monitor meanwhile: the agent deletes a
    batch once the broker has it, so without this a backend restart shows up as gaps.

    Callbacks run on the monitor's thread, must not block for long, and may not call
    :meth:`stop`; an exception in one is logged and counted, never fatal.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca_file: Path | str,
        cert_file: Path | str,
        key_file: Path | str,
        topic_prefix: str = "vt",
        session_expiry_s: int = 3600,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        keep_records: int | None = None,
        log_rejections: bool = True,
        on_batch: Callable[[BatchArrival], None] | None = None,
        on_status: Callable[[StatusArrival], None] | None = None,
        on_rejected: Callable[[Rejection], None] | None = None,
        on_connection: Callable[[ConnectionChange], None] | None = None,
    ) -> None:
        """Raises :class:`ConfigError` for unusable files (missing, unsafe key mode, no CN)."""
        try:
            self.settings = MqttSettings.model_validate({
                "host": host, "port": port, "ca_file": Path(ca_file), "cert_file": Path(cert_file),
                "key_file": Path(key_file), "topic_prefix": topic_prefix, "keepalive_s": keepalive_s,
                "connect_timeout_s": connect_timeout_s, "reconnect_min_s": reconnect_min_s,
                "reconnect_max_s": reconnect_max_s})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError.single("<backend options>", str(exc)) from None
        if session_expiry_s < 0:
            raise ConfigError.single("<backend options>", "session_expiry_s must be >= 0")
        check_private_key_file(self.settings.key_file)
        cn = common_name(load_certificate(self.settings.cert_file).subject)
        if not cn:
            raise ConfigError.single(str(cert_file), "certificate has no common name (CN); the "
                                                     "broker identifies clients by it")
        self.client_id = cn
        self._tls: ssl.SSLContext = build_tls_context(self.settings)
        check_tls_context(self._tls)
        self.session_expiry_s = session_expiry_s
        self.topics = tuple(f"{topic_prefix}/+/{kind}" for kind in (*DATA_STREAMS, STATUS))
        self._ledger = FleetLedger(topic_prefix, keep_records=keep_records,
                                  log_rejections=log_rejections)
        self._cond = threading.Condition(threading.RLock())
        self._callbacks = (on_batch, on_status, on_rejected)
        self._on_connection = on_connection
        self._client = self._make_client()
        self._session: _Session | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._connects = 0
        self._connect_failures: dict[str, int] = {}
        self._disconnects: dict[str, int] = {}
        self._last_failure: ConnectFailure | None = None
        self.callback_errors = 0
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    # -- lifecycle

    def start(self) -> BackendMonitor:
        if self._thread is not None:
            raise RuntimeError("monitor already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"backend-{self.client_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect (the persistent session stays with the broker) and end the thread."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> BackendMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker granted the subscriptions (again after a reconnect)."""
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.established and not session.closed

    # -- thread-safe accessors

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (re-checked after every message) holds; False on timeout.

        The predicate may call this monitor's accessors.
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def snapshot(self) -> MonitorSnapshot:
        with self._cond:
            snap = self._ledger.snapshot()
            conn = ConnectionStats(self.connected, self._subscribed.is_set(), self._connects,
                                   dict(self._connect_failures), dict(self._disconnects),
                                   self._last_failure)
        return MonitorSnapshot(snap.vehicles, snap.rejected, snap.recent_rejections, conn)

    def vehicles(self) -> list[str]:
        with self._cond:
            return self._ledger.vehicles()

    def _with(self, vehicle_id: str, read: Callable[[_VehicleLedger], Any], empty: Any) -> Any:
        with self._cond:
            v = self._ledger.vehicle(vehicle_id)
            return empty if v is None else read(v)

    def seqs(self, vehicle_id: str) -> list[int]:
        """Distinct sequence numbers received, ascending."""
        result: list[int] = self._with(vehicle_id, lambda v: list(v.seqs), [])
        return result

    def duplicates(self, vehicle_id: str) -> list[int]:
        """The seq of every duplicate arrival, in arrival order (a seq twice = two entries)."""
        result: list[int] = self._with(vehicle_id, lambda v: list(v.duplicate_seqs), [])
        return result

    def missing(self, vehicle_id: str, limit: int = 100_000) -> list[int]:
        """Numbers between the lowest and highest received that have not arrived (yet)."""
        result: list[int] = self._with(vehicle_id, lambda v: expand(v.seqs.gaps(), limit), [])
        return result

    def missing_ranges(self, vehicle_id: str) -> list[tuple[int, int]]:
        result: list[tuple[int, int]] = self._with(vehicle_id, lambda v: v.seqs.gaps(), [])
        return result

    def records(self, vehicle_id: str) -> list[Record]:
        """Complete records, each once, in arrival order (see ``keep_records``)."""
        result: list[Record] = self._with(vehicle_id, lambda v: [d.record for d in v.records], [])
        return result

    def delivered(self, vehicle_id: str) -> list[Delivered]:
        """Like :meth:`records`, with the seq(s) that carried each record."""
        result: list[Delivered] = self._with(vehicle_id, lambda v: list(v.records), [])
        return result

    def status(self, vehicle_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._with(
            vehicle_id, lambda v: None if v.status is None else json.loads(json.dumps(v.status)), None)
        return result

    def latest(self, vehicle_id: str) -> dict[str, tuple[int, Any]]:
        """Newest (ts_ns, value) per signal, by sample time (not arrival order)."""
        result: dict[str, tuple[int, Any]] = self._with(vehicle_id, lambda v: dict(v.latest), {})
        return result

    def ingest(self, topic: str, payload: bytes, *, retained: bool = False) -> Arrival:
        """Account for one message as if it came from the broker (also used internally)."""
        try:
            with self._cond:
                arrival = self._ledger.ingest(topic, payload, retained=retained)
                self._cond.notify_all()
        except Exception as exc:  # a bug here must not stop the monitor; the message is counted
            log.exception("ingest failed", topic=topic)
            with self._cond:
                arrival = self._ledger.reject(None, topic, "internal_error", repr(exc)[:300],
                                               payload, time.time())
                self._cond.notify_all()
        self._notify(arrival)
        return arrival

    def _notify(self, arrival: Arrival) -> None:
        on_batch, on_status, on_rejected = self._callbacks
        try:
            if isinstance(arrival, BatchArrival) and on_batch is not None:
                on_batch(arrival)
            elif isinstance(arrival, StatusArrival) and on_status is not None:
                on_status(arrival)
            elif isinstance(arrival, Rejection) and on_rejected is not None:
                on_rejected(arrival)
        except Exception:
            self.callback_errors += 1
            log.exception("backend callback failed")

    def _connection_change(self, change: ConnectionChange) -> None:
        if self._on_connection is None:
            return
        try:
            self._on_connection(change)
        except Exception:
            self.callback_errors += 1
            log.exception("backend connection callback failed")

    # -- MQTT

    def _make_client(self) -> paho.Client:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self.client_id, protocol=paho.MQTTv5)
        client.tls_set_context(self._tls)
        client.connect_timeout = self.settings.connect_timeout_s
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_log = self._on_log
        return client

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._session is None:
                    wait = self._next_attempt - time.monotonic()
                    if wait > 0:
                        self._stop.wait(min(wait, 0.5))
                        continue
                    self._open()
                else:
                    self._service(self._session)
        finally:
            session, self._session = self._session, None
            self._subscribed.clear()
            if session is not None:
                self._client.disconnect()

    def _open(self) -> None:
        session = _Session(deadline=time.monotonic() + self.settings.connect_timeout_s)
        self._session = session
        s = self.settings
        properties = None
        if self.session_expiry_s > 0:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
        try:
            rc = self._client.connect(s.host, s.port, s.keepalive_s,
                                      clean_start=self.session_expiry_s == 0, properties=properties)
        except (OSError, ValueError) as exc:
            self._end(session, classify_connect_error(exc, s.host, s.port))
            return
        if session.closed:
            self._end(session, session.end)
        elif rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._end(session, classify_lost_before_connack(session.socket_error))

    def _service(self, session: _Session) -> None:
        rc = self._client.loop(timeout=POLL_S)
        if session.closed:
            self._end(session, session.end)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._end(session, ConnectFailure("connection_lost", session.socket_error or str(rc))
                      if session.established else classify_lost_before_connack(session.socket_error))
            return
        now = time.monotonic()
        if not session.established and now > session.deadline:
            self._end(session, ConnectFailure("connack_timeout", "no CONNACK from the broker in time"))
        elif session.established and now - session.started_at >= STABLE_SESSION_S:
            self._failures = 0

    def _end(self, session: _Session, end: ConnectFailure | None) -> None:
        if self._session is not session:
            return
        end = end or ConnectFailure("connection_lost", "connection lost")
        self._session = None
        self._subscribed.clear()
        now = time.monotonic()
        if session.established and now - session.started_at >= STABLE_SESSION_S:
            self._failures = 0
        self._failures += 1
        delay = backoff_delay(self._failures, self.settings.reconnect_min_s,
                              self.settings.reconnect_max_s, self._rng.random)
        self._next_attempt = now + delay
        with self._cond:
            self._last_failure = end
            tally = self._disconnects if session.established else self._connect_failures
            tally[end.cause] = tally.get(end.cause, 0) + 1
        log.warning("backend disconnected" if session.established else "backend connect failed",
                    cause=end.cause, detail=end.detail,
                    broker=f"{self.settings.host}:{self.settings.port}", retry_in_s=round(delay, 2))
        session.closed = True
        self._client.disconnect()
        self._connection_change(ConnectionChange(
            "disconnected" if session.established else "failed", end.detail, end, delay))

    # -- paho callbacks (run inside connect()/loop() on the monitor's thread)

    def _on_log(self, client: paho.Client, userdata: Any, level: int, message: str) -> None:
        if level == paho.MQTT_LOG_ERR and self._session is not None:
            self._session.socket_error = message

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        session = self._session
        if session is None:
            return
        if reason_code.is_failure:
            session.closed = True
            session.end = ConnectFailure(
                "connack_refused", f"broker refused the connection: {reason_code} "
                                   f"(0x{reason_code.value:02x})")
            return
        session.established = True
        session.started_at = time.monotonic()
        with self._cond:
            self._connects += 1
        # retainHandling 0: the retained status of every vehicle comes with each subscribe.
        options = SubscribeOptions(qos=QOS, retainHandling=0)
        _, session.subscribe_mid = client.subscribe([(t, options) for t in self.topics])
        log.info("backend connected", broker=f"{self.settings.host}:{self.settings.port}",
                 client_id=self.client_id, session_present=flags.session_present)
        self._connection_change(ConnectionChange(
            "connected", f"{self.settings.host}:{self.settings.port} as {self.client_id}"
                         + (" (session resumed)" if flags.session_present else "")))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        session = self._session
        if session is None or mid != session.subscribe_mid:
            return
        refused = [f"{t}: {rc}" for t, rc in zip(self.topics, reason_codes, strict=False)
                   if rc.is_failure]
        if refused:
            session.closed = True
            session.end = ConnectFailure(
                "subscribe_refused", "broker refused the subscriptions (" + "; ".join(refused)
                + "); does the broker ACL let this identity read the fleet's topics?")
            return
        self._subscribed.set()
        with self._cond:
            self._cond.notify_all()
        self._connection_change(ConnectionChange("subscribed", ", ".join(self.topics)))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        session = self._session
        if session is None or session.closed:
            return
        session.closed = True
        if session.end is not None:
            return
        if flags.is_disconnect_packet_from_server:
            session.end = ConnectFailure("broker_disconnect", f"broker sent DISCONNECT: {reason_code}")
        elif not session.established:
            session.end = classify_lost_before_connack(session.socket_error)
        else:
            session.end = ConnectFailure("connection_lost",
                                         session.socket_error or f"connection lost ({reason_code})")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.ingest(message.topic, bytes(message.payload), retained=bool(message.retain))


# --------------------------------------------------------------------------- helpers for output


def format_value(value: object) -> str:
    if isinstance(value, float):
        if math.isfinite(value):
            return f"{value:.6g}"
        return str(value)
    return str(value)


def last_values(batch: DecodedBatch) -> dict[str, Any]:
    """The newest value of each signal in a telemetry batch, in first-appearance order."""
    newest: dict[str, tuple[int, Any]] = {}
    for s in batch.samples:
        seen = newest.get(s.signal)
        if seen is None or s.ts_ns >= seen[0]:
            newest[s.signal] = (s.ts_ns, s.value)
    return {signal: value for signal, (_, value) in newest.items()}


__all__ = ["Arrival", "BackendMonitor", "BatchArrival", "BootSnapshot", "ConnectionChange",
           "ConnectionStats", "Delivered", "FleetLedger", "MonitorSnapshot", "Rejection", "SeqSet",
           "StatusArrival", "VehicleSnapshot", "count_in", "expand", "format_ranges",
           "format_value", "last_values"]
