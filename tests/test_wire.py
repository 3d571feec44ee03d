"""Wire format: exact round trips, size-bounded splitting, strict rejection of bad payloads."""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import cbor2
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import wire
from agent.records import Aggregate, Event, Record, Sample
from agent.wire import (
    MAX_INT_VALUE,
    MIN_INT_VALUE,
    BatchRejected,
    DecodedBatch,
    EventPart,
    decode_batch,
    encode_records,
    merge_event_parts,
)

VEHICLE = "WVWZZZ1JZXW000001"
BOOT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
T0 = 1_732_212_345_123_456_789


def typed(value: object) -> tuple[str, str]:
    """Value with its type; repr tells -0.0 from 0.0 and keeps NaN comparable."""
    return type(value).__name__, repr(value)


def canon(record: Record) -> tuple[object, ...]:
    if isinstance(record, Sample):
        return ("S", record.signal, record.rule, record.ts_ns, typed(record.value),
                record.clock_synced)
    if isinstance(record, Aggregate):
        return ("A", record.signal, record.rule, record.start_ns, record.end_ns,
                tuple(sorted((k, typed(v)) for k, v in record.values.items())),
                record.clock_synced)
    return ("E", record.rule, record.trigger_ts_ns, record.condition, record.clock_synced,
            tuple(sorted((canon(s) for s in record.samples), key=repr)))


def column_key(record: Record) -> tuple[object, ...]:
    if isinstance(record, Sample):
        return ("S", record.signal, record.rule, record.clock_synced)
    if isinstance(record, Aggregate):
        return ("A", record.signal, record.rule, record.clock_synced)
    return ("E", record.clock_synced)


def columns(records: Iterable[Record]) -> dict[tuple[object, ...], list[tuple[object, ...]]]:
    """Per column, records in order: the order the wire promises to keep."""
    out: dict[tuple[object, ...], list[tuple[object, ...]]] = {}
    for record in records:
        out.setdefault(column_key(record), []).append(canon(record))
    return out


def decode_all(records: Sequence[Record], **kwargs: object) -> list[DecodedBatch]:
    result = encode_records(records, vehicle_id=VEHICLE, boot_id=BOOT, **kwargs)  # type: ignore[arg-type]
    assert result.rejected == []
    return [decode_batch(b.seal(seq)) for seq, b in enumerate(result.batches, start=1)]


def assert_round_trip(records: Sequence[Record], decoded: Sequence[DecodedBatch]) -> None:
    """Decoded records equal the input; parts of a split event come consecutively."""
    out: list[Record] = []
    parts: list[tuple[Event, EventPart]] = []
    for batch in decoded:
        out.extend(batch.samples)
        out.extend(batch.aggregates)
        for event, part in zip(batch.events, batch.event_parts, strict=True):
            assert part.index == len(parts), "parts of a split event must be consecutive"
            parts.append((event, part))
            if len(parts) == part.count:
                out.append(merge_event_parts(parts))
                parts = []
    assert parts == []
    assert Counter(map(canon, out)) == Counter(map(canon, records))
    assert columns(out) == columns(records)


def mixed_records() -> list[Record]:
    speed = [Sample("Vehicle.Speed", T0 + i * 100_000_017, 80.0 + i * 0.01, "speed", True)
             for i in range(20)]
    return [
        *speed,
        Sample("Vehicle.Gear", T0 + 5, "DRIVE", "gear", True),
        Sample("Vehicle.Gear", T0 + 900_000_000, "REVERSE", "gear", True),
        Sample("Vehicle.Counter", T0 + 7, 3, "counter", True),
        Sample("Vehicle.Counter", T0 + 8, 3.0, "counter", True),
        Sample("Vehicle.Torque", T0 + 9, -412.5, "torque", True),
        Sample("Vehicle.Torque", T0 + 10, -7, "torque", True),
        Sample("Vehicle.Big", T0 + 11, MAX_INT_VALUE, "big", True),
        Sample("Vehicle.Big", T0 + 12, MIN_INT_VALUE, "big", True),
        Sample("Vehicle.Zero", T0 + 13, -0.0, "zero", True),
        Sample("Vehicle.Speed", T0 - 1_000, 12.0, "early", False),
        Aggregate("Vehicle.Speed", "agg", T0, T0 + 10_000_000_000,
                  {"min": 80.0, "max": 80.19, "count": 20, "last": 80.19}, True),
        Aggregate("Vehicle.Gear", "agg_gear", T0, T0 + 10_000_000_000, {"last": "DRIVE"}, True),
        Event("hard_brake", T0 + 1_500_000_000, "Vehicle.Acceleration < -6",
              (*speed[:5], Sample("Vehicle.Acceleration", T0 + 3, -7.25, "hard_brake", False)),
              True),
        Event("door_open", T0 + 2, "Vehicle.Door == 'OPEN'", (), False),
    ]


@pytest.mark.parametrize("compression", ["zstd", "zlib", "none"])
def test_round_trip_keeps_values_types_and_order(compression: str) -> None:
    records = mixed_records()
    decoded = decode_all(records, compression=compression)
    assert_round_trip(records, decoded)
    for batch in decoded:
        assert batch.vehicle_id == VEHICLE and batch.boot_id == BOOT
        assert batch.schema_version == wire.SCHEMA_VERSION
        assert all(r.clock_synced == batch.clock_synced for r in batch.records)
    streams = Counter((b.stream, b.clock_synced) for b in decoded)
    assert streams == {("telemetry", True): 1, ("telemetry", False): 1, ("events", True): 1,
                       ("events", False): 1}
    event = next(e for b in decoded for e in b.events if e.rule == "hard_brake")
    accel = next(s for s in event.samples if s.signal == "Vehicle.Acceleration")
    assert accel.clock_synced is False and event.clock_synced is True  # own flag kept


def test_sequence_number_and_counts_in_envelope() -> None:
    result = encode_records(mixed_records(), vehicle_id=VEHICLE, boot_id=BOOT)
    batch = result.batches[0]
    decoded = decode_batch(batch.seal(2**63 - 1))
    assert decoded.seq == 2**63 - 1
    assert decoded.counts == batch.counts
    assert batch.sample_count == decoded.counts.values
    assert len(batch.seal(7)) <= batch.max_payload_size
    with pytest.raises(ValueError):
        batch.seal(-1)


def test_time_unit_follows_timestamp_resolution() -> None:
    micro = [Sample("s", T0 - T0 % 1000 + i * 100_000_000 + i * 1000, float(i), "r", True)
             for i in range(10)]
    assert decode_all(micro)[0].time_unit_ns == 1000
    nano = [*micro, Sample("s", T0, 1.0, "r", True)]
    decoded = decode_all(nano)
    assert decoded[0].time_unit_ns == 1
    assert_round_trip(nano, decoded)


def test_nan_and_infinity_survive() -> None:
    records = [Sample("s", T0, math.nan, "r", True), Sample("s", T0 + 1, math.inf, "r", True),
               Sample("s", T0 + 2, -math.inf, "r", True)]
    values = [s.value for s in decode_all(records)[0].samples]
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf]


def test_split_keeps_every_payload_under_the_limit() -> None:
    rnd = random.Random(3)
    records: list[Record] = [
        Sample(f"Vehicle.Signal{i % 40}", T0 + i * 1_000_017, rnd.uniform(-1e6, 1e6), "r", True)
        for i in range(8_000)]
    for compression in ("none", "zstd"):
        result = encode_records(records, vehicle_id=VEHICLE, boot_id=BOOT,
                                compression=compression, max_payload_bytes=8_192)  # type: ignore[arg-type]
        assert result.rejected == []
        assert len(result.batches) > 5
        assert all(b.max_payload_size <= 8_192 for b in result.batches)
        assert_round_trip(records, [decode_batch(b.seal(i)) for i, b in
                                    enumerate(result.batches)])


def big_event(signals: int, per_signal: int) -> Event:
    rnd = random.Random(signals)
    samples = tuple(Sample(f"Vehicle.S{k}", T0 + i * 10_000_003 + k, rnd.random(), "cap", True)
                    for k in range(signals) for i in range(per_signal))
    return Event("crash", T0 + 5, "Vehicle.Accel > 8", samples, True)


def test_oversized_event_is_split_by_signals_and_merges_back() -> None:
    event = big_event(12, 400)
    result = encode_records([event], vehicle_id=VEHICLE, boot_id=BOOT, compression="none",
                            max_payload_bytes=20_000)
    assert result.rejected == []
    decoded = [decode_batch(b.seal(i)) for i, b in enumerate(result.batches)]
    parts = [(e, p) for d in decoded for e, p in zip(d.events, d.event_parts, strict=True)]
    assert len(parts) > 1 and {p.count for _, p in parts} == {len(parts)}
    for e, _ in parts:  # split by signals: no signal spans two parts
        assert all(e2 is e or not {s.signal for s in e.samples} & {s.signal for s in e2.samples}
                   for e2, _ in parts)
    assert canon(merge_event_parts(reversed(parts))) == canon(event)
    assert all(b.max_payload_size <= 20_000 for b in result.batches)


def test_event_that_cannot_be_split_is_rejected_not_dropped() -> None:
    huge = big_event(1, 5000)
    ok = Sample("Vehicle.Speed", T0, 1.0, "r", True)
    result = encode_records([huge, ok], vehicle_id=VEHICLE, boot_id=BOOT, compression="none",
                            max_payload_bytes=8192)
    assert [r.reason for r in result.rejected] == ["event_too_large"]
    assert result.rejected[0].record is huge
    assert "max_payload_bytes=8192" in result.rejected[0].detail
    assert isinstance(result.rejected[0], wire.RejectedInput)
    assert [s for b in result.batches for s in decode_batch(b.seal(1)).samples] == [ok]


@pytest.mark.parametrize("record", [
    Sample("s", -1, 1.0, "r", True),
    Sample("s", T0, True, "r", True),
    Sample("s", T0, MAX_INT_VALUE + 1, "r", True),
    Sample("", T0, 1.0, "r", True),
    Sample("s", T0, "\ud800", "r", True),
    Sample("s", T0, [1], "r", True),  # type: ignore[arg-type]
    Aggregate("s", "r", T0, T0 + 1, {"min": None}, True),  # type: ignore[dict-item]
    Event("e", T0, "c", (Sample("s", T0, object(), "r", True),), True),  # type: ignore[arg-type]
    "not a record",
])
def test_invalid_records_are_rejected_with_a_reason(record: Record) -> None:
    good = Sample("s", T0, 2.0, "r", True)
    result = encode_records([record, good], vehicle_id=VEHICLE, boot_id=BOOT)
    assert [r.reason for r in result.rejected] == ["invalid_record"]
    assert result.rejected[0].detail
    assert decode_batch(result.batches[0].seal(1)).samples == (good,)


def test_enum_subclass_values_become_plain() -> None:
    import enum

    class Gear(enum.StrEnum):
        DRIVE = "DRIVE"

    class Level(enum.IntEnum):
        HIGH = 3

    records = [Sample("g", T0, Gear.DRIVE, "r", True), Sample("l", T0, Level.HIGH, "r", True)]
    decoded = decode_all(records)[0].samples
    assert [typed(s.value) for s in decoded] == [("str", "'DRIVE'"), ("int", "3")]


def test_zlib_fallback_when_zstandard_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "zstandard", None)
    assert wire.effective_compression("zstd") == "zlib"
    result = encode_records(mixed_records(), vehicle_id=VEHICLE, boot_id=BOOT,
                            compression="zstd")
    assert {b.compression for b in result.batches} <= {"zlib", "none"}
    assert_round_trip(mixed_records(), [decode_batch(b.seal(1)) for b in result.batches])


# ----------------------------------------------------------------------- rejection


def envelope(body: object = None, *, raw_body: bytes | None = None, comp: str = "none",
             **overrides: object) -> bytes:
    env: dict[str, object] = {"v": 1, "vehicle": VEHICLE, "boot": BOOT, "seq": 1,
                              "stream": "telemetry", "comp": comp,
                              "body": raw_body if raw_body is not None else cbor2.dumps(body)}
    env.update(overrides)
    return cbor2.dumps({k: v for k, v in env.items() if v is not ...})


def valid_body() -> dict[str, object]:
    return {"tb": T0, "tu": 1, "synced": True,
            "n": {"samples": 2, "aggregates": 0, "events": 0, "event_samples": 0},
            "samples": [{"sig": "s", "rule": "r", "t": [0, 5], "v": [1.5, 2]}],
            "aggregates": []}


def rejected_reason(payload: bytes, **kwargs: int) -> str:
    with pytest.raises(BatchRejected) as info:
        decode_batch(payload, **kwargs)
    return info.value.reason


def test_hand_built_body_decodes() -> None:
    batch = decode_batch(envelope(valid_body()))
    assert batch.samples == (Sample("s", T0, 1.5, "r", True), Sample("s", T0 + 5, 2, "r", True))


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "bad_cbor"),
    (b"\xff\xff", "bad_cbor"),
    (cbor2.dumps([1, 2]), "bad_batch"),
    (envelope(valid_body(), v=2), "unsupported_version"),
    (envelope(valid_body(), comp="lz4"), "unsupported_compression"),
    (envelope(valid_body(), stream="bulk"), "bad_batch"),
    (envelope(valid_body(), extra=1), "bad_batch"),
    (envelope(valid_body(), seq=-1), "bad_batch"),
    (envelope(valid_body(), seq=True), "bad_batch"),
    (envelope(valid_body(), vehicle=...), "bad_batch"),
    (envelope(valid_body()) + b"\x00", "bad_cbor"),
    (cbor2.dumps(cbor2.CBORTag(55799, {"v": 1})), "bad_cbor"),
    (envelope({**valid_body(), "n": {"samples": 3, "aggregates": 0, "events": 0,
                                     "event_samples": 0}}), "count_mismatch"),
    (envelope({**valid_body(), "tu": 7}), "bad_batch"),
    (envelope({**valid_body(), "tb": -1}), "bad_batch"),
    (envelope({**valid_body(), "samples": [{"sig": "s", "rule": "r", "t": [0], "v": [True]}]}),
     "bad_batch"),
    (envelope({**valid_body(), "samples": [{"sig": "s", "rule": "r", "t": [0, 1], "v": [1]}]}),
     "bad_batch"),
    (envelope({**valid_body(), "samples": [{"sig": "s", "rule": "r", "t": [-T0 - 1],
                                            "v": [1]}]}), "bad_batch"),
    (envelope({**valid_body(), "samples": [
        {"sig": "s", "rule": "r", "t": [0], "v": [cbor2.CBORTag(2, b"\x01" * 20)]}]}),
     "bad_cbor"),
    (envelope(raw_body=cbor2.dumps(valid_body()) + b"\x00"), "bad_cbor"),
    (envelope(raw_body=b"garbage", comp="zlib"), "bad_compression"),
    (envelope(raw_body=zlib.compress(cbor2.dumps(valid_body()))[:-3], comp="zlib"),
     "bad_compression"),
    (envelope(raw_body=zlib.compress(cbor2.dumps(valid_body())) + b"x", comp="zlib"),
     "bad_compression"),
    (envelope(raw_body=b"garbage", comp="zstd"), "bad_compression"),
    (envelope(raw_body=zstandard.ZstdCompressor(write_content_size=False).compress(
        cbor2.dumps(valid_body())), comp="zstd"), "bad_compression"),
])
def test_malformed_payloads_are_rejected_with_reason(payload: bytes, reason: str) -> None:
    assert rejected_reason(payload) == reason


def test_decompression_bomb_is_refused() -> None:
    bomb = b"\x00" * (64 * 1024 * 1024)
    assert rejected_reason(envelope(raw_body=zlib.compress(bomb, 9), comp="zlib")) == "too_large"
    zbomb = zstandard.ZstdCompressor(level=1).compress(bomb)
    assert len(zbomb) < 100_000
    assert rejected_reason(envelope(raw_body=zbomb, comp="zstd")) == "too_large"
    small = envelope(valid_body(), comp="none")
    assert rejected_reason(small, max_decompressed_bytes=10) == "too_large"


def test_zstd_frame_lying_about_its_size_is_refused() -> None:
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(b"\x00" * 100_000))
    declared = zstandard.frame_content_size(bytes(frame))
    assert declared == 100_000
    # Single-segment frame: magic (4), descriptor (1), 4-byte content size; claim 1000.
    assert zstandard.frame_header_size(bytes(frame)) == 9 and frame[4] == 0xA0
    frame[5:9] = (1000).to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(frame)) == 1000
    assert rejected_reason(envelope(raw_body=bytes(frame), comp="zstd")) == "bad_compression"


# ----------------------------------------------------------------------- properties

names = st.text(min_size=1, max_size=12)
timestamps = st.one_of(st.integers(0, 2**63 - 1),
                       st.integers(0, 10**6).map(lambda d: T0 + d * 1000))
values = st.one_of(st.integers(MIN_INT_VALUE, MAX_INT_VALUE), st.floats(allow_nan=False),
                   st.text(max_size=16), st.sampled_from(["DRIVE", "PARK", "REVERSE"]))
samples = st.builds(Sample, st.sampled_from(["A", "B.c", "Vehicle.Speed"]) | names, timestamps,
                    values, st.sampled_from(["r1", ""]) | names, st.booleans())
aggregates = st.builds(
    Aggregate, names, names, timestamps, timestamps,
    st.dictionaries(st.sampled_from(["min", "max", "mean", "count", "last"]) | names, values,
                    max_size=5),
    st.booleans())
events = st.builds(Event, names, timestamps, st.text(max_size=40),
                   st.lists(samples, max_size=20).map(tuple), st.booleans())
records = st.lists(st.one_of(samples, samples, aggregates, events), max_size=60)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.sampled_from(["zstd", "zlib", "none"]))
def test_property_round_trip(recs: list[Record], compression: str) -> None:
    assert_round_trip(recs, decode_all(recs, compression=compression))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.integers(600, 4000))
def test_property_split_under_any_limit(recs: list[Record], limit: int) -> None:
    result = encode_records(recs, vehicle_id=VEHICLE, boot_id=BOOT, compression="none",
                            max_payload_bytes=limit)
    assert all(b.max_payload_size <= limit for b in result.batches)
    assert {r.reason for r in result.rejected} <= {"event_too_large", "record_too_large"}
    rejected_ids = {id(r.record) for r in result.rejected}
    kept = [r for r in recs if id(r) not in rejected_ids]
    assert_round_trip(kept, [decode_batch(b.seal(9)) for b in result.batches])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_random_bytes_only_rejected(data: bytes) -> None:
    with pytest.raises(BatchRejected):
        decode_batch(data)


def _valid_payloads() -> list[bytes]:
    out = []
    for compression in ("zstd", "zlib", "none"):
        result = encode_records(mixed_records(), vehicle_id=VEHICLE, boot_id=BOOT,
                                compression=compression)  # type: ignore[arg-type]
        out.extend(b.seal(42) for b in result.batches)
    return out


VALID = _valid_payloads()


def decode_or_reject(payload: bytes) -> None:
    try:
        decode_batch(payload)
    except BatchRejected as exc:
        assert exc.reason and str(exc)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                        min_size=1, max_size=6),
       st.sampled_from(["flip", "truncate", "insert"]))
def test_property_mutated_payloads_only_rejected(payload: bytes,
                                                 edits: list[tuple[int, int]],
                                                 how: str) -> None:
    data = bytearray(payload)
    for position, byte in edits:
        at = position % len(data)
        if how == "flip":
            data[at] ^= byte or 1
        elif how == "truncate":
            del data[at:]
            if not data:
                break
        else:
            data[at:at] = bytes([byte])
    decode_or_reject(bytes(data))


leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.floats(),
                 st.text(max_size=8), st.binary(max_size=8),
                 st.sampled_from(["sig", "rule", "t", "v", "fn", "dur", "tb", "tu", "n"]))
cbor_values = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["tb", "tu", "synced", "n", "samples", "aggregates", "events", "sig",
                         "rule", "t", "v", "fn", "dur", "cond", "part", "samples", "x"]),
        inner, max_size=6),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["telemetry", "events"]), cbor_values)
def test_property_structured_garbage_bodies_only_rejected(stream: str, body: object) -> None:
    decode_or_reject(envelope(body, stream=stream))


def _leaf_paths(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, (*path, k))] + [path]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*path, i))] + [path]
    return [path]


VALID_BODIES = [cbor2.loads(zlib.decompress(cbor2.loads(p)["body"])) for p in VALID
                if cbor2.loads(p)["comp"] == "zlib"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(range(len(VALID_BODIES))), st.data(), cbor_values)
def test_property_mutated_bodies_only_rejected(index: int, data: st.DataObject,
                                               replacement: object) -> None:
    body = cbor2.loads(cbor2.dumps(VALID_BODIES[index]))  # deep copy
    paths = [p for p in _leaf_paths(body) if p]
    path = data.draw(st.sampled_from(paths))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = replacement
    stream = "events" if "events" in body else "telemetry"
    decode_or_reject(envelope(body, stream=stream))


def test_record_budget_splits_batches_and_guards_the_decoder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_RECORDS_PER_BATCH", 100)
    records: list[Record] = [Sample("s", T0 + i, 1, "r", True) for i in range(1000)]
    result = encode_records(records, vehicle_id=VEHICLE, boot_id=BOOT)
    assert len(result.batches) >= 10
    assert all(b.counts.values <= 100 for b in result.batches)
    assert_round_trip(records, [decode_batch(b.seal(1)) for b in result.batches])
    body = {**valid_body(), "n": {"samples": 101, "aggregates": 0, "events": 0,
                                  "event_samples": 0},
            "samples": [{"sig": "s", "rule": "r", "t": [1] * 101, "v": [0] * 101}]}
    assert rejected_reason(envelope(body)) == "too_large"
