"""Wire format of uplink batches: columnar CBOR in a small envelope, size-bounded.

Pure logic, no I/O. :func:`encode_records` turns pipeline records into
:class:`EncodedBatch` objects (split so that every payload stays under
``max_payload_bytes`` and every batch has one clock-synchronised flag); the outbox
assigns the sequence number inside its transaction and calls
:meth:`EncodedBatch.seal` to get the bytes that are published. :func:`decode_batch`
is the strict inverse used by tests and by the cloud side. docs/protocol.md is the
normative description of the format; keep the two in step.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeVar

import cbor2

from agent.errors import RejectedInput
from agent.records import Aggregate, Event, Record, Sample, SignalValue

try:
    import zstandard
except ImportError:  # zlib is the dependency-free fallback
    zstandard = None  # type: ignore[assignment]

SCHEMA_VERSION: Final = 1

Stream = Literal["telemetry", "events"]
Compression = Literal["zstd", "zlib", "none"]
STREAMS: Final[tuple[Stream, ...]] = ("telemetry", "events")
COMPRESSIONS: Final[tuple[Compression, ...]] = ("zstd", "zlib", "none")

DEFAULT_MAX_PAYLOAD_BYTES: Final = 128 * 1024  # AWS IoT Core's MQTT payload limit
MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # encoder: uncompressed body never larger
MAX_RECORDS_PER_BATCH: Final = 262_144  # samples + aggregates + events + event samples
DEFAULT_MAX_DECOMPRESSED_BYTES: Final = MAX_BODY_BYTES  # decoder: bomb guard
_STREAM_NAMES: Final[dict[str, Stream]] = {s: s for s in STREAMS}
_COMPRESSION_NAMES: Final[dict[str, Compression]] = {c: c for c in COMPRESSIONS}

MAX_SEQ: Final = (1 << 63) - 1
MAX_TS_NS: Final = (1 << 63) - 1
MIN_INT_VALUE: Final = -(1 << 64)  # CBOR major types 0 and 1, no bignums
MAX_INT_VALUE: Final = (1 << 64) - 1
MAX_ID_CHARS: Final = 128
MAX_NAME_CHARS: Final = 256
MAX_TEXT_VALUE_CHARS: Final = 1024
MAX_CONDITION_CHARS: Final = 4096
MAX_AGGREGATE_FUNCTIONS: Final = 32
MAX_TIME_UNIT_NS: Final = 1_000_000_000

ZSTD_LEVEL: Final = 6
ZLIB_LEVEL: Final = 6
_CBOR_MAX_DEPTH: Final = 8
_SPLIT_HEADROOM: Final = 0.9  # aim chunks at 90 % of the limit when splitting
_PART_PLACEHOLDER: Final = 0xFFFF  # widest part number used while sizing event parts


class BatchRejected(RejectedInput):
    """A payload that is not a valid batch of this schema (decoder side)."""


class RecordRejected(RejectedInput):
    """A record the encoder cannot put on the wire; carries the record."""

    def __init__(self, reason: str, detail: str, record: Record) -> None:
        super().__init__(reason, detail)
        self.record = record


def zstd_available() -> bool:
    return zstandard is not None


def effective_compression(requested: Compression) -> Compression:
    """``zstd`` falls back to ``zlib`` when the zstandard module is not installed."""
    if requested == "zstd" and zstandard is None:
        return "zlib"
    return requested


def stream_of(record: Record) -> Stream:
    return "events" if isinstance(record, Event) else "telemetry"


def samples_in(record: Record) -> int:
    """How many values a record carries (an aggregate counts as one)."""
    if isinstance(record, Event):
        return len(record.samples) if isinstance(record.samples, tuple | list) else 0
    return 1


@dataclass(frozen=True, slots=True)
class BatchCounts:
    samples: int
    aggregates: int
    events: int
    event_samples: int

    @property
    def values(self) -> int:
        """Samples + aggregates + samples inside events: the outbox's ``sample_count``."""
        return self.samples + self.aggregates + self.event_samples


@dataclass(frozen=True, slots=True)
class EventPart:
    """Which part of an event a decoded :class:`Event` is; ``EventPart(0, 1)`` is whole."""

    index: int
    count: int


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A compressed batch body waiting for its sequence number."""

    stream: Stream
    vehicle_id: str
    boot_id: str
    compression: Compression
    body: bytes
    raw_body_bytes: int
    clock_synced: bool
    counts: BatchCounts

    @property
    def sample_count(self) -> int:
        return self.counts.values

    @property
    def max_payload_size(self) -> int:
        """Payload size with the widest possible sequence number."""
        return len(self.seal(MAX_SEQ))

    def seal(self, seq: int) -> bytes:
        """The payload to publish: the envelope carrying ``seq`` and the body."""
        if not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"sequence number out of range: {seq}")
        return _envelope(self.vehicle_id, self.boot_id, seq, self.stream, self.compression,
                         self.body)


@dataclass(frozen=True, slots=True)
class EncodeResult:
    batches: list[EncodedBatch]
    rejected: list[RecordRejected]


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    schema_version: int
    vehicle_id: str
    boot_id: str
    seq: int
    stream: Stream
    compression: Compression
    time_base_ns: int
    time_unit_ns: int
    clock_synced: bool
    counts: BatchCounts
    samples: tuple[Sample, ...]
    aggregates: tuple[Aggregate, ...]
    events: tuple[Event, ...]
    event_parts: tuple[EventPart, ...]  # aligned with ``events``

    @property
    def records(self) -> list[Record]:
        return [*self.samples, *self.aggregates, *self.events]


def merge_event_parts(parts: Iterable[tuple[Event, EventPart]]) -> Event:
    """Join the parts of one split event (any order) back into the whole event."""
    ordered = sorted(parts, key=lambda p: p[1].index)
    if not ordered:
        raise ValueError("no parts given")
    first, part = ordered[0]
    count = part.count
    if [p.index for _, p in ordered] != list(range(count)) or any(
        p.count != count for _, p in ordered
    ):
        raise ValueError(f"parts are incomplete or inconsistent: {[p for _, p in ordered]}")
    for event, _ in ordered[1:]:
        if (event.rule, event.trigger_ts_ns, event.condition, event.clock_synced) != (
            first.rule, first.trigger_ts_ns, first.condition, first.clock_synced
        ):
            raise ValueError("parts belong to different events")
    samples = tuple(s for event, _ in ordered for s in event.samples)
    return replace(first, samples=samples)


# --------------------------------------------------------------------------- encoding


def encode_records(
    records: Sequence[Record],
    *,
    vehicle_id: str,
    boot_id: str,
    compression: Compression = "zstd",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> EncodeResult:
    """Encode records into batches, each payload at most ``max_payload_bytes``.

    Records are grouped by stream and clock-synchronised flag (first appearance order)
    and split by records when a batch would be too large; an event too large on its own
    is split by signals into parts. A record that cannot be encoded is returned in
    ``rejected`` with the reason, never dropped silently.
    """
    for name, ident in (("vehicle_id", vehicle_id), ("boot_id", boot_id)):
        if not isinstance(ident, str) or not 0 < len(ident) <= MAX_ID_CHARS or not _encodable(
                ident):
            raise ValueError(f"{name} must be 1..{MAX_ID_CHARS} characters: {ident!r}")
    if max_payload_bytes < 512:
        raise ValueError(f"max_payload_bytes too small to hold a batch: {max_payload_bytes}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression: {compression!r}")
    rejected: list[RecordRejected] = []
    groups: dict[tuple[Stream, bool], list[Record]] = {}
    for record in records:
        try:
            clean = _validated(record)
        except _Invalid as exc:
            rejected.append(RecordRejected("invalid_record", str(exc), record))
            continue
        groups.setdefault((stream_of(clean), clean.clock_synced), []).append(clean)
    encoder = _Encoder(vehicle_id, boot_id, effective_compression(compression),
                       max_payload_bytes, rejected)
    batches: list[EncodedBatch] = []
    for (stream, synced), group in groups.items():
        if stream == "telemetry":
            batches.extend(encoder.telemetry(group, synced))
        else:
            batches.extend(encoder.events([_EventUnit(e, 0, 1, e.samples)
                                           for e in group if isinstance(e, Event)], synced))
    return EncodeResult(batches, rejected)


class _Invalid(Exception):
    pass


def _value_problem(value: object) -> str | None:
    if isinstance(value, bool):
        return "boolean values are not signal values"
    if isinstance(value, int):
        return None if MIN_INT_VALUE <= value <= MAX_INT_VALUE else "integer out of range"
    if isinstance(value, float):
        return None
    if isinstance(value, str):
        if len(value) > MAX_TEXT_VALUE_CHARS:
            return "text value too long"
        return None if _encodable(value) else "text value is not valid Unicode"
    return f"unsupported value type {type(value).__name__}"


def _plain(value: SignalValue) -> SignalValue:
    """Subclasses (IntEnum, StrEnum, ...) become the plain type CBOR round-trips."""
    if type(value) in (int, float, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str.__str__(value)


def _encodable(text: str) -> bool:
    """Lone surrogates cannot be encoded as UTF-8 (CBOR text must be UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: object, what: str, max_chars: int, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be text, got {type(value).__name__}")
    if len(value) > max_chars or (not allow_empty and not value):
        raise _Invalid(f"{what} must be {0 if allow_empty else 1}..{max_chars} characters")
    if not _encodable(value):
        raise _Invalid(f"{what} is not valid Unicode text")


def _check_ts(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TS_NS:
        raise _Invalid(f"{what} must be an integer 0..2**63-1 ns, got {value!r}")


def _check_flag(value: object) -> None:
    if not isinstance(value, bool):
        raise _Invalid(f"clock_synced must be a bool, got {type(value).__name__}")


def _validated_sample(sample: object) -> Sample:
    if type(sample) is Sample:  # fast path for the common, plainly valid sample
        signal, rule, ts, value = sample.signal, sample.rule, sample.ts_ns, sample.value
        if (type(signal) is str and 0 < len(signal) <= MAX_NAME_CHARS and signal.isascii()
                and type(rule) is str and len(rule) <= MAX_NAME_CHARS and rule.isascii()
                and type(ts) is int and 0 <= ts <= MAX_TS_NS
                and type(sample.clock_synced) is bool
                and (type(value) is float
                     or (type(value) is int and MIN_INT_VALUE <= value <= MAX_INT_VALUE)
                     or (type(value) is str and len(value) <= MAX_TEXT_VALUE_CHARS
                         and value.isascii()))):
            return sample
    if not isinstance(sample, Sample):
        raise _Invalid(f"expected a Sample, got {type(sample).__name__}")
    _check_text(sample.signal, "signal", MAX_NAME_CHARS, allow_empty=False)
    _check_text(sample.rule, "rule", MAX_NAME_CHARS, allow_empty=True)
    _check_ts(sample.ts_ns, "ts_ns")
    _check_flag(sample.clock_synced)
    problem = _value_problem(sample.value)
    if problem:
        raise _Invalid(f"{sample.signal}: {problem}")
    if type(sample.value) not in (int, float, str):
        return replace(sample, value=_plain(sample.value))
    return sample


def _validated(record: object) -> Record:
    if isinstance(record, Sample):
        return _validated_sample(record)
    if isinstance(record, Aggregate):
        _check_text(record.signal, "signal", MAX_NAME_CHARS, allow_empty=False)
        _check_text(record.rule, "rule", MAX_NAME_CHARS, allow_empty=True)
        _check_ts(record.start_ns, "start_ns")
        _check_ts(record.end_ns, "end_ns")
        _check_flag(record.clock_synced)
        if not isinstance(record.values, dict) or len(record.values) > MAX_AGGREGATE_FUNCTIONS:
            raise _Invalid(f"aggregate values must be a dict of at most "
                           f"{MAX_AGGREGATE_FUNCTIONS} functions")
        for fn, value in record.values.items():
            _check_text(fn, "aggregate function name", MAX_NAME_CHARS, allow_empty=False)
            problem = _value_problem(value)
            if problem:
                raise _Invalid(f"{record.signal}.{fn}: {problem}")
        if all(type(k) is str and type(v) in (int, float, str) for k, v in record.values.items()):
            return record
        return replace(record, values={str.__str__(k): _plain(v) for k, v in record.values.items()})
    if isinstance(record, Event):
        _check_text(record.rule, "rule", MAX_NAME_CHARS, allow_empty=True)
        _check_ts(record.trigger_ts_ns, "trigger_ts_ns")
        _check_text(record.condition, "condition", MAX_CONDITION_CHARS, allow_empty=True)
        _check_flag(record.clock_synced)
        if not isinstance(record.samples, tuple):
            raise _Invalid("event samples must be a tuple")
        samples = tuple(_validated_sample(s) for s in record.samples)
        if all(a is b for a, b in zip(samples, record.samples, strict=True)):
            return record
        return replace(record, samples=samples)
    raise _Invalid(f"not a record: {type(record).__name__}")


@dataclass(frozen=True, slots=True)
class _EventUnit:
    """An event, or one part of an event split by signals."""

    event: Event
    index: int
    count: int
    samples: tuple[Sample, ...]


_U = TypeVar("_U")


def _time_unit(offsets: Iterable[int]) -> int:
    """Largest power of ten (<= 1 s) dividing every offset, so deltas stay exact."""
    g = 0
    for offset in offsets:
        g = math.gcd(g, offset)
        if g == 1:
            return 1
    if g == 0:
        return 1
    unit = 1
    while unit < MAX_TIME_UNIT_NS and g % (unit * 10) == 0:
        unit *= 10
    return unit


def _sample_columns(samples: Iterable[Sample], tb: int, tu: int,
                    batch_synced: bool | None) -> list[dict[str, Any]]:
    """Columns keyed by (signal, rule[, flag]); timestamps chained from the time base."""
    columns: dict[tuple[str, str, bool], tuple[list[int], list[SignalValue], list[int]]] = {}
    for s in samples:
        key = (s.signal, s.rule, s.clock_synced if batch_synced is not None else True)
        col = columns.get(key)
        if col is None:
            col = columns[key] = ([], [], [tb])
        col[0].append((s.ts_ns - col[2][0]) // tu)
        col[2][0] = s.ts_ns
        col[1].append(s.value)
    out: list[dict[str, Any]] = []
    for (signal, rule, synced), (ts, values, _) in columns.items():
        column: dict[str, Any] = {"sig": signal, "rule": rule, "t": ts, "v": values}
        if batch_synced is not None and synced != batch_synced:
            column["synced"] = synced
        out.append(column)
    return out


def _aggregate_columns(aggregates: Iterable[Aggregate], tb: int,
                       tu: int) -> list[dict[str, Any]]:
    columns: dict[tuple[str, str, tuple[str, ...]],
                  tuple[list[int], list[int], list[list[SignalValue]], list[int]]] = {}
    for a in aggregates:
        fns = tuple(a.values)
        key = (a.signal, a.rule, fns)
        col = columns.get(key)
        if col is None:
            col = columns[key] = ([], [], [[] for _ in fns], [tb])
        col[0].append((a.start_ns - col[3][0]) // tu)
        col[3][0] = a.start_ns
        col[1].append((a.end_ns - a.start_ns) // tu)
        for values, fn in zip(col[2], fns, strict=True):
            values.append(a.values[fn])
    return [
        {"sig": signal, "rule": rule, "fn": list(fns), "t": starts, "dur": durs, "v": values}
        for (signal, rule, fns), (starts, durs, values, _) in columns.items()
    ]


def _envelope(vehicle_id: str, boot_id: str, seq: int, stream: str, compression: str,
              body: bytes) -> bytes:
    return cbor2.dumps({"v": SCHEMA_VERSION, "vehicle": vehicle_id, "boot": boot_id,
                        "seq": seq, "stream": stream, "comp": compression, "body": body},
                       canonical=True)


class _Encoder:
    def __init__(self, vehicle_id: str, boot_id: str, compression: Compression,
                 max_payload_bytes: int, rejected: list[RecordRejected]) -> None:
        self.vehicle_id = vehicle_id
        self.boot_id = boot_id
        self.compression = compression
        self.limit = max_payload_bytes
        self.rejected = rejected
        self._zstd = (zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
                      if compression == "zstd" and zstandard is not None else None)

    # -- bodies

    def _telemetry_body(self, records: Sequence[Record], synced: bool) -> dict[str, Any]:
        samples = [r for r in records if isinstance(r, Sample)]
        aggregates = [r for r in records if isinstance(r, Aggregate)]
        stamps = [s.ts_ns for s in samples]
        stamps += [a.start_ns for a in aggregates] + [a.end_ns for a in aggregates]
        tb = min(stamps)
        tu = _time_unit(t - tb for t in stamps)
        return {
            "tb": tb, "tu": tu, "synced": synced,
            "n": {"samples": len(samples), "aggregates": len(aggregates), "events": 0,
                  "event_samples": 0},
            "samples": _sample_columns(samples, tb, tu, None),
            "aggregates": _aggregate_columns(aggregates, tb, tu),
        }

    def _events_body(self, units: Sequence[_EventUnit], synced: bool,
                     placeholder_parts: bool = False) -> dict[str, Any]:
        stamps = [u.event.trigger_ts_ns for u in units]
        stamps += [s.ts_ns for u in units for s in u.samples]
        tb = min(stamps)
        tu = _time_unit(t - tb for t in stamps)
        events = []
        for u in units:
            part = ([_PART_PLACEHOLDER, _PART_PLACEHOLDER] if placeholder_parts
                    else [u.index, u.count])
            events.append({"rule": u.event.rule, "t": (u.event.trigger_ts_ns - tb) // tu,
                           "cond": u.event.condition, "part": part,
                           "samples": _sample_columns(u.samples, tb, tu, synced)})
        return {
            "tb": tb, "tu": tu, "synced": synced,
            "n": {"samples": 0, "aggregates": 0, "events": len(units),
                  "event_samples": sum(len(u.samples) for u in units)},
            "events": events,
        }

    # -- compression and sizing

    def _compress(self, body: dict[str, Any]) -> tuple[Compression, bytes, int]:
        raw = cbor2.dumps(body, canonical=True)
        packed: bytes | None = None
        if self._zstd is not None:
            packed = self._zstd.compress(raw)
        elif self.compression == "zlib":
            packed = zlib.compress(raw, ZLIB_LEVEL)
        if packed is None or len(packed) >= len(raw):
            return "none", raw, len(raw)
        return self.compression, packed, len(raw)

    def _fits(self, stream: Stream, body: dict[str, Any]) -> tuple[bool, float,
                                                                     tuple[Compression, bytes, int]]:
        """Whether the body fits; the float says by how much it overshoots (ratio)."""
        packed = self._compress(body)
        compression, data, raw_len = packed
        size = len(_envelope(self.vehicle_id, self.boot_id, MAX_SEQ, stream, compression, data))
        n = body["n"]
        records = n["samples"] + n["aggregates"] + n["events"] + n["event_samples"]
        ratio = max(size / self.limit, raw_len / MAX_BODY_BYTES, records / MAX_RECORDS_PER_BATCH)
        return ratio <= 1.0, ratio, packed

    def _pack(self, stream: Stream, units: Sequence[_U],
              build: Callable[[Sequence[_U]], dict[str, Any]],
              too_big: Callable[[_U, int], list[tuple[Sequence[_U], dict[str, Any],
                                                         tuple[Compression, bytes, int]]]],
              ) -> list[tuple[Sequence[_U], dict[str, Any], tuple[Compression, bytes, int]]]:
        """Split ``units`` (order kept) into chunks whose payloads fit the limit."""
        body = build(units)
        fits, ratio, packed = self._fits(stream, body)
        if fits:
            return [(units, body, packed)]
        if len(units) == 1:
            return too_big(units[0], math.ceil(ratio * self.limit))
        parts = min(len(units), max(2, math.ceil(ratio / _SPLIT_HEADROOM)))
        step = len(units) / parts
        out = []
        for i in range(parts):
            chunk = units[round(i * step):round((i + 1) * step)]
            if chunk:
                out.extend(self._pack(stream, chunk, build, too_big))
        return out

    def _batch(self, stream: Stream, body: dict[str, Any],
               packed: tuple[Compression, bytes, int]) -> EncodedBatch:
        compression, data, raw_len = packed
        n = body["n"]
        return EncodedBatch(stream, self.vehicle_id, self.boot_id, compression, data, raw_len,
                            body["synced"], BatchCounts(n["samples"], n["aggregates"],
                                                        n["events"], n["event_samples"]))

    # -- streams

    def telemetry(self, records: Sequence[Record], synced: bool) -> list[EncodedBatch]:
        def too_big(record: Record, size: int) -> list[Any]:
            self.rejected.append(RecordRejected(
                "record_too_large",
                f"{type(record).__name__} of {getattr(record, 'signal', '?')} encodes to "
                f"{size} bytes, more than max_payload_bytes={self.limit}", record))
            return []

        chunks = self._pack("telemetry", records, lambda rs: self._telemetry_body(rs, synced),
                            too_big)
        return [self._batch("telemetry", body, packed) for _, body, packed in chunks]

    def events(self, units: Sequence[_EventUnit], synced: bool) -> list[EncodedBatch]:
        def build(us: Sequence[_EventUnit]) -> dict[str, Any]:
            return self._events_body(us, synced)

        def too_big(unit: _EventUnit, size: int) -> list[Any]:
            if unit.count == 1:
                parts = self._split_event(unit.event, synced)
                if parts is not None:
                    return self._pack("events", parts, build, too_big)
            event = unit.event
            self.rejected.append(RecordRejected(
                "event_too_large",
                f"event of rule {event.rule!r} triggered at {event.trigger_ts_ns} with "
                f"{len(event.samples)} samples: {size} bytes, and no split by signals fits "
                f"max_payload_bytes={self.limit}; shorten the capture window or its signals",
                event))
            return []

        chunks = self._pack("events", units, build, too_big)
        return [self._batch("events", body, packed) for _, body, packed in chunks]

    def _split_event(self, event: Event, synced: bool) -> list[_EventUnit] | None:
        """Parts of ``event`` by signal columns, each fitting alone; None if impossible."""
        columns: dict[tuple[str, str, bool], list[Sample]] = {}
        for s in event.samples:
            columns.setdefault((s.signal, s.rule, s.clock_synced), []).append(s)
        groups = list(columns.values())
        if len(groups) < 2:
            return None
        parts: list[tuple[Sample, ...]] = []

        def place(gs: list[list[Sample]]) -> bool:
            samples = tuple(s for g in gs for s in g)
            body = self._events_body([_EventUnit(event, 0, 1, samples)], synced,
                                     placeholder_parts=True)
            if self._fits("events", body)[0]:
                parts.append(samples)
                return True
            if len(gs) == 1:
                return False
            mid = len(gs) // 2
            return place(gs[:mid]) and place(gs[mid:])

        if not place(groups):
            return None
        return [_EventUnit(event, i, len(parts), samples) for i, samples in enumerate(parts)]


# --------------------------------------------------------------------------- decoding


def _reject_tag(decoder: object, *_: object) -> object:
    raise BatchRejected("bad_cbor", "CBOR tags are not allowed")


# Every tag cbor2 would interpret (dates, bignums, regexes, shared refs, sets, ...) is
# refused; unknown tags go to tag_hook, which refuses them too.
_SEMANTIC_REJECTS: Final = {tag: _reject_tag for tag in (
    *range(0, 64), 100, 256, 258, 260, 261, 1004, 55799)}


def _cbor(data: bytes, what: str) -> Any:
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        stream, tag_hook=_reject_tag, semantic_decoders=_SEMANTIC_REJECTS,
        max_depth=_CBOR_MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False,
        strict_hashable_types=True)
    try:
        value = decoder.decode()
    except BatchRejected:
        raise
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, MemoryError,
            RecursionError, EOFError) as exc:
        raise BatchRejected("bad_cbor", f"{what}: {exc}") from None
    if stream.tell() != len(data):
        raise BatchRejected("bad_cbor", f"{what}: {len(data) - stream.tell()} trailing bytes")
    return value


def strict_cbor(data: bytes, what: str) -> Any:
    """Decode one CBOR item with no tags, no indefinite lengths, bounded depth, nothing trailing;
    raises :class:`BatchRejected` ("bad_cbor") otherwise. For other payloads of the protocol."""
    return _cbor(data, what)


def _bad(where: str, message: str) -> BatchRejected:
    return BatchRejected("bad_batch", f"{where}: {message}")


def _map(value: object, where: str, required: set[str],
         optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad(where, f"expected a map, got {type(value).__name__}")
    keys = set(value)
    if not required <= keys or not keys <= required | optional:
        missing = sorted(required - keys)
        unknown = sorted(repr(k)[:40] for k in keys - required - optional)[:10]
        raise _bad(where, f"keys wrong (missing {missing}, unknown {unknown})")
    return value


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise _bad(where, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(where, f"integer out of range {lo}..{hi}")
    return value


def _text(value: object, where: str, max_chars: int, *, allow_empty: bool = True) -> str:
    if type(value) is not str:
        raise _bad(where, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars or (not allow_empty and not value):
        raise _bad(where, f"text length must be {0 if allow_empty else 1}..{max_chars}")
    return value


def _bool(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise _bad(where, f"expected a bool, got {type(value).__name__}")
    return value


def _list(value: object, where: str, length: int | None = None) -> list[Any]:
    if type(value) is not list:
        raise _bad(where, f"expected an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise _bad(where, f"expected {length} items, got {len(value)}")
    return value


def _signal_value(value: object, where: str) -> SignalValue:
    if type(value) is float:
        return value
    if type(value) is int:
        return _int(value, where, MIN_INT_VALUE, MAX_INT_VALUE)
    if type(value) is str:
        return _text(value, where, MAX_TEXT_VALUE_CHARS)
    raise _bad(where, f"expected a number or text, got {type(value).__name__}")


class _Clock:
    """Turns chained deltas back into absolute nanoseconds, checking the range; also
    keeps the record budget so a small body cannot expand into millions of objects."""

    def __init__(self, tb: int, tu: int) -> None:
        self.tb = tb
        self.tu = tu
        self.records_left = MAX_RECORDS_PER_BATCH

    def take(self, count: int, where: str) -> None:
        self.records_left -= count
        if self.records_left < 0:
            raise BatchRejected("too_large", f"{where}: more than {MAX_RECORDS_PER_BATCH} "
                                             f"records in one batch")

    def absolute(self, offset: object, where: str) -> int:
        return self.check(self.tb + _int(offset, where, -MAX_TS_NS, MAX_TS_NS) * self.tu, where)

    def chain(self, deltas: list[Any], where: str) -> list[int]:
        out: list[int] = []
        current = self.tb
        for i, delta in enumerate(deltas):
            current += _int(delta, f"{where}[{i}]", -MAX_TS_NS, MAX_TS_NS) * self.tu
            out.append(self.check(current, f"{where}[{i}]"))
        return out

    @staticmethod
    def check(ts: int, where: str) -> int:
        if not 0 <= ts <= MAX_TS_NS:
            raise _bad(where, "timestamp outside 0..2**63-1 ns")
        return ts


def _decode_sample_columns(columns: object, where: str, clock: _Clock, synced: bool,
                           allow_flag: bool) -> list[Sample]:
    out: list[Sample] = []
    optional = frozenset({"synced"}) if allow_flag else frozenset()
    for i, raw in enumerate(_list(columns, where)):
        at = f"{where}[{i}]"
        col = _map(raw, at, {"sig", "rule", "t", "v"}, optional)
        signal = _text(col["sig"], f"{at}.sig", MAX_NAME_CHARS, allow_empty=False)
        rule = _text(col["rule"], f"{at}.rule", MAX_NAME_CHARS)
        flag = _bool(col["synced"], f"{at}.synced") if "synced" in col else synced
        deltas = _list(col["t"], f"{at}.t")
        clock.take(len(deltas), at)
        stamps = clock.chain(deltas, f"{at}.t")
        values = _list(col["v"], f"{at}.v", len(stamps))
        if not stamps:
            raise _bad(at, "empty column")
        out.extend(Sample(signal, ts, _signal_value(v, f"{at}.v[{j}]"), rule, flag)
                   for j, (ts, v) in enumerate(zip(stamps, values, strict=True)))
    return out


def _decode_aggregates(columns: object, clock: _Clock, synced: bool) -> list[Aggregate]:
    out: list[Aggregate] = []
    for i, raw in enumerate(_list(columns, "aggregates")):
        at = f"aggregates[{i}]"
        col = _map(raw, at, {"sig", "rule", "fn", "t", "dur", "v"})
        signal = _text(col["sig"], f"{at}.sig", MAX_NAME_CHARS, allow_empty=False)
        rule = _text(col["rule"], f"{at}.rule", MAX_NAME_CHARS)
        fns = [_text(f, f"{at}.fn", MAX_NAME_CHARS, allow_empty=False)
               for f in _list(col["fn"], f"{at}.fn")]
        if len(fns) > MAX_AGGREGATE_FUNCTIONS or len(set(fns)) != len(fns):
            raise _bad(f"{at}.fn", "too many or repeated function names")
        deltas = _list(col["t"], f"{at}.t")
        clock.take(len(deltas), at)
        starts = clock.chain(deltas, f"{at}.t")
        if not starts:
            raise _bad(at, "empty column")
        durations = _list(col["dur"], f"{at}.dur", len(starts))
        values = [_list(v, f"{at}.v[{k}]", len(starts))
                  for k, v in enumerate(_list(col["v"], f"{at}.v", len(fns)))]
        for j, start in enumerate(starts):
            end = clock.check(
                start + _int(durations[j], f"{at}.dur[{j}]", -MAX_TS_NS, MAX_TS_NS) * clock.tu,
                f"{at}.dur[{j}]")
            row = {fn: _signal_value(values[k][j], f"{at}.v[{k}][{j}]")
                   for k, fn in enumerate(fns)}
            out.append(Aggregate(signal, rule, start, end, row, synced))
    return out


def _decode_events(events: object, clock: _Clock,
                   synced: bool) -> tuple[list[Event], list[EventPart]]:
    out: list[Event] = []
    parts: list[EventPart] = []
    for i, raw in enumerate(_list(events, "events")):
        at = f"events[{i}]"
        clock.take(1, at)
        ev = _map(raw, at, {"rule", "t", "cond", "part", "samples"})
        part = _list(ev["part"], f"{at}.part", 2)
        count = _int(part[1], f"{at}.part[1]", 1, MAX_SEQ)
        index = _int(part[0], f"{at}.part[0]", 0, count - 1)
        samples = _decode_sample_columns(ev["samples"], f"{at}.samples", clock, synced, True)
        out.append(Event(_text(ev["rule"], f"{at}.rule", MAX_NAME_CHARS),
                         clock.absolute(ev["t"], f"{at}.t"),
                         _text(ev["cond"], f"{at}.cond", MAX_CONDITION_CHARS),
                         tuple(samples), synced))
        parts.append(EventPart(index, count))
    return out, parts


def _decompress(compression: str, body: bytes, limit: int) -> bytes:
    if compression == "none":
        return body
    if compression == "zlib":
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BatchRejected("bad_compression", f"zlib: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise BatchRejected("too_large", f"body inflates to more than {limit} bytes")
        if not inflater.eof:
            raise BatchRejected("bad_compression", "zlib stream is truncated")
        if inflater.unused_data:
            raise BatchRejected("bad_compression", "bytes after the zlib stream")
        return out
    if zstandard is None:
        raise BatchRejected("unsupported_compression", "zstd body but zstandard is not installed")
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise BatchRejected("bad_compression", f"zstd: {exc}") from None
    if declared < 0:
        raise BatchRejected("bad_compression", "zstd frame does not declare its content size")
    if declared > limit:
        raise BatchRejected("too_large", f"body declares {declared} bytes, limit {limit}")
    # The declared size bounds the output: libzstd fails a frame that decodes to more.
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 24).decompressobj()
    try:
        out = decompressor.decompress(body)
    except zstandard.ZstdError as exc:
        raise BatchRejected("bad_compression", f"zstd: {exc}") from None
    if len(out) != declared or not decompressor.eof:
        raise BatchRejected("bad_compression", "zstd frame is truncated or inconsistent")
    if decompressor.unused_data:
        raise BatchRejected("bad_compression", "bytes after the zstd frame")
    return out


def decode_batch(payload: bytes,
                 *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES) -> DecodedBatch:
    """Validate and decode one payload; raise :class:`BatchRejected` if anything is off.

    Records come back as they went in, grouped by column: samples of one (signal,
    rule) keep their order, columns appear in first-appearance order.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise BatchRejected("bad_cbor", f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_decompressed_bytes:
        raise BatchRejected("too_large", f"payload of {len(payload)} bytes")
    envelope = _cbor(payload, "envelope")
    if type(envelope) is not dict or "v" not in envelope:
        raise _bad("envelope", "not a map with a schema version 'v'")
    version = _int(envelope["v"], "envelope.v", 0, MAX_SEQ)
    if version != SCHEMA_VERSION:
        raise BatchRejected("unsupported_version",
                            f"schema version {version}, this decoder reads {SCHEMA_VERSION}")
    _map(envelope, "envelope", {"v", "vehicle", "boot", "seq", "stream", "comp", "body"})
    vehicle_id = _text(envelope["vehicle"], "envelope.vehicle", MAX_ID_CHARS, allow_empty=False)
    boot_id = _text(envelope["boot"], "envelope.boot", MAX_ID_CHARS, allow_empty=False)
    seq = _int(envelope["seq"], "envelope.seq", 0, MAX_SEQ)
    stream = _STREAM_NAMES.get(envelope["stream"]) if type(envelope["stream"]) is str else None
    if stream is None:
        raise _bad("envelope.stream", f"unknown stream {envelope['stream']!r:.80}")
    compression = (_COMPRESSION_NAMES.get(envelope["comp"])
                   if type(envelope["comp"]) is str else None)
    if compression is None:
        raise BatchRejected("unsupported_compression", f"compression {envelope['comp']!r:.80}")
    if type(envelope["body"]) is not bytes:
        raise _bad("envelope.body", "expected a byte string")
    body = _cbor(_decompress(compression, envelope["body"], max_decompressed_bytes), "body")
    sections = {"samples", "aggregates"} if stream == "telemetry" else {"events"}
    body = _map(body, "body", {"tb", "tu", "synced", "n", *sections})
    tb = _int(body["tb"], "body.tb", 0, MAX_TS_NS)
    tu = _int(body["tu"], "body.tu", 1, MAX_TIME_UNIT_NS)
    if 10 ** round(math.log10(tu)) != tu:
        raise _bad("body.tu", f"time unit {tu} is not a power of ten")
    synced = _bool(body["synced"], "body.synced")
    n = _map(body["n"], "body.n", {"samples", "aggregates", "events", "event_samples"})
    counts = BatchCounts(*(_int(n[k], f"body.n.{k}", 0, MAX_SEQ)
                           for k in ("samples", "aggregates", "events", "event_samples")))
    clock = _Clock(tb, tu)
    samples: list[Sample] = []
    aggregates: list[Aggregate] = []
    events: list[Event] = []
    parts: list[EventPart] = []
    if stream == "telemetry":
        samples = _decode_sample_columns(body["samples"], "samples", clock, synced, False)
        aggregates = _decode_aggregates(body["aggregates"], clock, synced)
    else:
        events, parts = _decode_events(body["events"], clock, synced)
    actual = BatchCounts(len(samples), len(aggregates), len(events),
                         sum(len(e.samples) for e in events))
    if actual != counts:
        raise BatchRejected("count_mismatch", f"body.n says {counts}, content has {actual}")
    if counts.values + counts.events == 0:
        raise _bad("body", "empty batch")
    return DecodedBatch(version, vehicle_id, boot_id, seq, stream, compression, tb, tu, synced,
                        counts, tuple(samples), tuple(aggregates), tuple(events), tuple(parts))
