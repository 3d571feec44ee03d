"""The backend monitor and ``telematics-sim backend`` against a real mosquitto (mutual TLS, ACL).

Vehicles publish real batches (``agent.wire.encode_records(...).batches[i].seal(seq)``)
with their own certificates on their own topics; the monitor's accounting is asserted
exactly. The pure parts (SeqSet, FleetLedger) are unit-tested at the bottom.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as paho
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from agent import pki
from agent.errors import EX_CONFIG, ConfigError
from agent.records import Aggregate, Event, Record, Sample
from agent.sinks import record_to_json
from agent.wire import EncodedBatch, decode_batch, encode_records
from simulator import cli
from simulator.backend import BackendMonitor, BatchArrival, FleetLedger, SeqSet, StatusArrival
from tests.broker import BACKEND, OTHER_VEHICLE_ID, VEHICLE_ID, MosquittoBroker, make_dev_pki

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # generous upper bound for slow machines; never a pass/fail timing threshold
T0 = 1_750_000_000_000_000_000
VIN = VEHICLE_ID


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiDir:
    return make_dev_pki(tmp_path_factory.mktemp("fleet"))


@pytest.fixture
def broker(fleet: pki.PkiDir) -> Iterator[MosquittoBroker]:
    """A fresh broker per test: backend sessions (and queued messages) never leak between tests."""
    with MosquittoBroker(fleet) as b:
        yield b


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # cli.main configures logging for the whole process


def monitor_for(broker: MosquittoBroker, **kwargs: Any) -> BackendMonitor:
    p = broker.pki
    kwargs.setdefault("reconnect_min_s", 0.2)
    kwargs.setdefault("reconnect_max_s", 1.0)
    return BackendMonitor(host=broker.host, port=broker.port, ca_file=p.ca_cert,
                          cert_file=p.cert(BACKEND), key_file=p.key(BACKEND), **kwargs)


class Vehicle:
    """A vehicle's MQTT client: its own certificate, publishes QoS 1 and waits for PUBACK."""

    def __init__(self, broker: MosquittoBroker, vehicle_id: str = VIN) -> None:
        self.vehicle_id = vehicle_id
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=vehicle_id, protocol=paho.MQTTv5)
        self.client.tls_set_context(broker.tls_context(vehicle_id))
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not connected.wait(WAIT):
            self.close()
            raise RuntimeError(f"{vehicle_id} did not connect")

    def publish(self, stream: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(f"vt/{self.vehicle_id}/{stream}", payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def speed(ts_s: float, value: float, signal_name: str = "Vehicle.Speed") -> Sample:
    return Sample(signal_name, T0 + int(ts_s * 1e9), value, "speed_10hz", True)


def telemetry_batch(start_s: float, n: int = 3, *, boot: str = "boot-a",
                    vehicle_id: str = VIN) -> tuple[EncodedBatch, list[Record]]:
    records: list[Record] = [speed(start_s + i * 0.1, 50.0 + i) for i in range(n)]
    records.append(Sample("Vehicle.Powertrain.Gear", T0 + int(start_s * 1e9), "DRIVE", "gear", True))
    records.append(Aggregate("Vehicle.Speed", "speed_stats", T0 + int(start_s * 1e9),
                             T0 + int((start_s + 60) * 1e9), {"min": 12.5, "max": 88.25, "count": 600},
                             True))
    result = encode_records(records, vehicle_id=vehicle_id, boot_id=boot)
    assert len(result.batches) == 1 and not result.rejected
    # A batch groups samples by column: that is the order records come back in.
    return result.batches[0], list(decode_batch(result.batches[0].seal(1)).records)


def event_batch(at_s: float, *, boot: str = "boot-a") -> tuple[EncodedBatch, Event]:
    event = Event("hard_brake", T0 + int(at_s * 1e9), "Vehicle.Acceleration < -6",
                  (speed(at_s - 0.1, 52.0), speed(at_s, 49.5)), True)
    result = encode_records([event], vehicle_id=VIN, boot_id=boot)
    assert len(result.batches) == 1
    return result.batches[0], event


# ------------------------------------------------------------------ monitor against mosquitto


def test_accounting_of_out_of_order_duplicate_gap_and_malformed(broker: MosquittoBroker) -> None:
    batches: list[BatchArrival] = []
    statuses: list[StatusArrival] = []
    with monitor_for(broker, on_batch=batches.append, on_status=statuses.append) as monitor:
        assert monitor.wait_subscribed(WAIT)
        assert monitor.client_id == BACKEND
        car = Vehicle(broker)
        other = Vehicle(broker, OTHER_VEHICLE_ID)
        try:
            b1, r1 = telemetry_batch(0)
            b2, r2 = telemetry_batch(1)
            b5, r5 = telemetry_batch(5)
            b4, ev4 = event_batch(4)
            b7, r7 = telemetry_batch(7, boot="boot-b")
            car.publish("status", json.dumps({
                "state": "online", "vehicle_id": VIN, "boot_id": "boot-a",
                "losses": {"telemetry": {"evicted": {"batches": 2, "samples": 20}}},
                "databases_replaced": 0}).encode(), retain=True)
            car.publish("telemetry", b1.seal(1))
            car.publish("telemetry", b2.seal(2))
            car.publish("telemetry", b5.seal(5))  # 3 and 4 are missing for now
            car.publish("events", b4.seal(4))  # backlog arriving late: fills part of the gap
            car.publish("telemetry", b2.seal(2))  # duplicate (QoS 1 resend)
            car.publish("telemetry", b"\xa1\x61v\x01garbage")  # malformed
            car.publish("telemetry", telemetry_batch(9, vehicle_id=OTHER_VEHICLE_ID)[0].seal(9))
            car.publish("events", b7.seal(8))  # a telemetry batch on the events topic
            car.publish("telemetry", b7.seal(7))  # new boot; 6 is missing
            other.publish("telemetry", telemetry_batch(0, vehicle_id=OTHER_VEHICLE_ID)[0].seal(3))
        finally:
            car.close()
            other.close()
        # 1 status + 6 batch messages + 3 rejected for VIN, 1 batch for the other vehicle
        assert monitor.wait_for(lambda: _messages(monitor) == 11, WAIT), monitor.snapshot()

        assert monitor.vehicles() == sorted([VIN, OTHER_VEHICLE_ID])
        assert monitor.seqs(VIN) == [1, 2, 4, 5, 7]
        assert monitor.duplicates(VIN) == [2]
        assert monitor.missing(VIN) == [3, 6]
        assert monitor.records(VIN) == [*r1, *r2, *r5, ev4, *r7]  # the duplicate not twice
        assert monitor.seqs(OTHER_VEHICLE_ID) == [3]
        assert monitor.missing(OTHER_VEHICLE_ID) == []
        assert monitor.latest(VIN)["Vehicle.Speed"] == (T0 + int((7 + 2 * 0.1) * 1e9), 52.0)

        snap = monitor.snapshot()
        v = snap.vehicle(VIN)
        assert (v.batches, v.messages, v.duplicates, v.missing) == (5, 6, 1, 2)
        assert v.missing_ranges == ((3, 3), (6, 6))
        assert v.missing_at_boot_changes == ((6, 6),)  # between boot-a's 5 and boot-b's 7
        assert v.streams == {"telemetry": 4, "events": 1}
        assert (v.samples, v.aggregates, v.events, v.event_samples) == (16, 4, 1, 2)
        assert v.rejected == {"bad_cbor": 1, "vehicle_mismatch": 1, "stream_mismatch": 1}
        assert [(b.boot_id, b.batches, b.first_seq, b.last_seq) for b in v.boots] == [
            ("boot-a", 4, 1, 5), ("boot-b", 1, 7, 7)]
        assert v.state == "online" and v.status is not None and v.status["boot_id"] == "boot-a"
        assert v.reported_losses == {"telemetry": {"evicted": {"batches": 2, "samples": 20}}}
        assert snap.rejected == {"bad_cbor": 1, "vehicle_mismatch": 1, "stream_mismatch": 1}
        assert snap.connection is not None and snap.connection.connects == 1

        # The callback saw every batch message, flagged the way the accounting says.
        flags = [(a.seq, a.duplicate, a.backlog, a.gap_opened, a.gap_filled, a.missing_now)
                 for a in batches if a.vehicle_id == VIN]
        assert flags == [(1, False, False, None, False, 0), (2, False, False, None, False, 0),
                         (5, False, False, (3, 4), False, 2), (4, False, True, None, True, 1),
                         (2, True, True, None, False, 1), (7, False, False, (6, 6), False, 2)]
        assert [d.to_json(VIN) for d in batches[3].delivered] == [
            {**record_to_json(ev4), "vehicle_id": VIN, "seq": 4}]
        assert statuses[0].losses == {"telemetry": {"evicted": {"batches": 2, "samples": 20}}}
        assert statuses[0].retained is False  # delivered live, not as a stored retained copy


def _messages(monitor: BackendMonitor) -> int:
    snap = monitor.snapshot()
    return (sum(v.messages + v.status_updates for v in snap.vehicles.values())
            + sum(snap.rejected.values()))


def test_split_event_is_reassembled_from_parts_arriving_out_of_order(
        broker: MosquittoBroker) -> None:
    signals = [f"Vehicle.Sensor{i:02d}" for i in range(6)]
    samples = tuple(Sample(sig, T0 + k * 10_000_000, float(k * 7 + i) + 0.123456789, "cap", True)
                    for i, sig in enumerate(signals) for k in range(40))
    event = Event("crash", T0 + 200_000_000, "Vehicle.Airbag == 1", samples, True)
    batches = encode_records([event], vehicle_id=VIN, boot_id="b", compression="none",
                             max_payload_bytes=1024).batches
    assert len(batches) >= 3  # the event did not fit one batch
    with monitor_for(broker) as monitor:
        assert monitor.wait_subscribed(WAIT)
        car = Vehicle(broker)
        try:
            order = list(range(len(batches)))[::-1]
            for i in order:
                car.publish("events", batches[i].seal(10 + i))
        finally:
            car.close()
        assert monitor.wait_for(lambda: len(monitor.seqs(VIN)) == len(batches), WAIT)
        v = monitor.snapshot().vehicle(VIN)
        assert (v.events, v.event_parts, v.incomplete_events) == (1, len(batches), 0)
        [merged] = monitor.delivered(VIN)
        assert merged.seq == 10  # the part that completed it arrived last
        assert merged.part_seqs == tuple(10 + i for i in range(len(batches)))
        assert isinstance(merged.record, Event)
        assert (merged.record.rule, merged.record.trigger_ts_ns) == ("crash", event.trigger_ts_ns)
        assert sorted(merged.record.samples, key=lambda s: (s.signal, s.ts_ns)) == sorted(
            samples, key=lambda s: (s.signal, s.ts_ns))


def test_persistent_session_delivers_what_arrived_while_the_monitor_was_away(
        broker: MosquittoBroker) -> None:
    with monitor_for(broker, session_expiry_s=300) as first:
        assert first.wait_subscribed(WAIT)
    car = Vehicle(broker)
    try:
        car.publish("telemetry", telemetry_batch(0)[0].seal(41))  # no backend connected now
    finally:
        car.close()
    with monitor_for(broker, session_expiry_s=300) as second:
        assert second.wait_for(lambda: second.seqs(VIN) == [41], WAIT), second.snapshot()


def test_reconnects_after_a_broker_restart(broker: MosquittoBroker) -> None:
    changes: list[str] = []
    with monitor_for(broker, on_connection=lambda c: changes.append(c.state)) as monitor:
        assert monitor.wait_subscribed(WAIT)
        broker.restart()
        assert monitor.wait_for(lambda: monitor.snapshot().connection.connects >= 2  # type: ignore[union-attr]
                                and monitor.wait_subscribed(0), WAIT)
        assert monitor.wait_subscribed(WAIT)
        car = Vehicle(broker)
        try:
            car.publish("telemetry", telemetry_batch(0)[0].seal(1))
        finally:
            car.close()
        assert monitor.wait_for(lambda: monitor.seqs(VIN) == [1], WAIT)
        snap = monitor.snapshot()
        assert snap.connection is not None and sum(snap.connection.disconnects.values()) >= 1
        assert changes[:2] == ["connected", "subscribed"] and "disconnected" in changes


def test_refuses_an_unsafe_or_unusable_identity(fleet: pki.PkiDir, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(fleet.key(BACKEND).read_bytes())
    loose.chmod(0o644)
    common = {"host": "127.0.0.1", "port": 1, "ca_file": fleet.ca_cert}
    with pytest.raises(ConfigError, match="chmod 600"):
        BackendMonitor(cert_file=fleet.cert(BACKEND), key_file=loose, **common)
    with pytest.raises(ConfigError, match="does not exist"):
        BackendMonitor(cert_file=tmp_path / "nope.crt", key_file=fleet.key(BACKEND), **common)
    with pytest.raises(ConfigError, match="belong together"):
        BackendMonitor(cert_file=fleet.cert(VIN), key_file=fleet.key(BACKEND), **common)
    with pytest.raises(ConfigError, match="wildcards"):
        BackendMonitor(cert_file=fleet.cert(BACKEND), key_file=fleet.key(BACKEND),
                       topic_prefix="vt/#", **common)


# ------------------------------------------------------------------ the CLI


def _cli(broker: MosquittoBroker, *extra: str) -> list[str]:
    return [sys.executable, "-m", "simulator", "backend", "--host", broker.host,
            "--port", str(broker.port), "--ca", str(broker.pki.ca_cert),
            "--cert", str(broker.pki.cert(BACKEND)), "--key", str(broker.pki.key(BACKEND)), *extra]


class Lines:
    """Collects a child's stdout lines on a thread, so the test can wait for one."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(text in ln for ln in self.lines), WAIT)

    def text(self) -> str:
        self._thread.join(WAIT)
        return "\n".join(self.lines)


def test_cli_writes_json_lines_and_stats_and_stops_on_sigint(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    out, stats = tmp_path / "records.jsonl", tmp_path / "stats.json"
    b1, r1 = telemetry_batch(0)
    b3, r3 = telemetry_batch(3)
    b2, ev2 = event_batch(2)
    proc = subprocess.Popen(_cli(broker, "--output", str(out), "--stats", str(stats),
                                 "--duration", "120", "--color", "never"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200"})
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    try:
        assert lines.wait_for("backend: subscribed"), lines.lines
        car = Vehicle(broker)
        try:
            car.publish("telemetry", b1.seal(1))
            car.publish("telemetry", b3.seal(3))
            car.publish("telemetry", b1.seal(1))
            car.publish("events", b2.seal(2))
            car.publish("telemetry", b"\xffnot cbor")
        finally:
            car.close()
        assert lines.wait_for("REJECTED"), lines.lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = lines.text()
    assert f"{VIN} #1 telemetry 4 samples, 1 aggregate" in text
    assert "Speed 52 · Powertrain.Gear DRIVE · Speed[60 s] min=12.5 max=88.25 count=600" in text
    assert "gap: #2 not received (yet); 1 missing now" in text
    assert "#1 duplicate (already received, ignored)" in text
    assert "EVENT hard_brake at" in text and "when Vehicle.Acceleration < -6" in text
    assert "REJECTED vt/TESTVIN0000000001/telemetry (9 B): bad_cbor" in text
    assert "backend summary after" in text

    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [{**record_to_json(r), "vehicle_id": VIN, "seq": seq}
                for seq, rs in ((1, r1), (3, r3), (2, [ev2])) for r in rs]
    assert records == expected

    data = json.loads(stats.read_text())
    v = data["vehicles"][VIN]
    assert (v["batches"], v["messages"], v["duplicates"], v["duplicate_seqs"]) == (3, 4, 1, [1])
    assert (v["missing"], v["missing_ranges"], v["first_seq"], v["last_seq"]) == (0, [], 1, 3)
    assert v["rejected"] == {"bad_cbor": 1} and v["events"] == 1 and v["samples"] == 8
    assert data["stopped_by"] == "signal" and data["connection"]["connects"] == 1


def test_cli_stops_after_duration_and_reports_an_empty_fleet(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    done = subprocess.run(_cli(broker, "--duration", "1", "--quiet", "--stats", str(stats)),
                          capture_output=True, text=True, cwd=ROOT, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert "nothing received" in done.stdout and "backend: subscribed" not in done.stdout
    data = json.loads(stats.read_text())
    assert data["vehicles"] == {} and data["stopped_by"] == "duration"


def test_cli_exit_codes_for_bad_identity_and_unreachable_broker(
        fleet: pki.PkiDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(fleet.key(BACKEND).read_bytes())
    loose.chmod(0o644)
    base = ["backend", "--ca", str(fleet.ca_cert), "--cert", str(fleet.cert(BACKEND))]
    assert cli.main([*base, "--key", str(loose), "--duration", "1"]) == EX_CONFIG
    assert "chmod 600" in capsys.readouterr().err
    assert cli.main(["backend", "--duration", "1"]) == 2
    assert "--pki DIR" in capsys.readouterr().err
    # Nothing listens on this port: retried with backoff, then a clear reason and 69.
    from tests.broker import free_port
    code = cli.main(["backend", "--pki", str(fleet.root), "--port", str(free_port()),
                     "--duration", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 69 and "never connected to the broker: connection_refused" in err


# ------------------------------------------------------------------ pure parts


def test_seq_set_ranges_gaps_and_duplicates() -> None:
    s = SeqSet()
    assert [s.add(x) for x in (5, 1, 2, 9, 3, 2, 7, 8)] == [True] * 5 + [False, True, True]
    assert s.ranges() == [(1, 3), (5, 5), (7, 9)]
    assert s.gaps() == [(4, 4), (6, 6)]
    assert list(s) == [1, 2, 3, 5, 7, 8, 9] and len(s) == 7 and (s.first, s.last) == (1, 9)
    assert s.add(4) and s.add(6) and s.ranges() == [(1, 9)] and s.gaps() == []
    assert 6 in s and 10 not in s and "6" not in s


def _ledger_batch(ledger: FleetLedger, seq: int, payload: bytes | None = None) -> object:
    return ledger.ingest(f"vt/{VIN}/telemetry", payload or telemetry_batch(0)[0].seal(seq))


def test_ledger_rejects_bad_input_with_reasons_and_keeps_counting() -> None:
    ledger = FleetLedger("vt")
    batch = telemetry_batch(0)[0]
    good = batch.seal(1)
    other_payload = telemetry_batch(1)[0].seal(1)  # same seq, different content
    cases: Sequence[tuple[str, bytes, str]] = [
        (f"vt/{VIN}/telemetry", good[:-3], "bad_cbor"),
        (f"vt/{VIN}/telemetry", b"", "bad_cbor"),
        (f"vt/{VIN}/status", b"{not json", "bad_status"),
        (f"vt/{VIN}/status", b"[1, 2]", "bad_status"),
        (f"vt/{VIN}/status", b'{"state": "sleeping"}', "bad_status"),
        (f"vt/{VIN}/status", b'{"state": "online", "losses": {"telemetry": 3}}', "bad_status"),
        (f"vt/{VIN}/status", b'{"state": "online", "vehicle_id": "SOMEONE"}', "vehicle_mismatch"),
        (f"vt/{VIN}/status", b'{"state": "online"}' + b" " * 70_000, "bad_status"),
        (f"vt/{VIN}/status", b"[" * 60_000, "bad_status"),
        ("vt/extra/level/telemetry", good, "unexpected_topic"),
        ("other/x/telemetry", good, "unexpected_topic"),
    ]
    for topic, payload, reason in cases:
        arrival = ledger.ingest(topic, payload)
        assert getattr(arrival, "reason", None) == reason, (topic, payload[:40], arrival)
    assert ledger.ingest(f"vt/{VIN}/telemetry", good).duplicate is False  # type: ignore[union-attr]
    conflict = ledger.ingest(f"vt/{VIN}/telemetry", other_payload)
    assert isinstance(conflict, BatchArrival) and conflict.duplicate and conflict.conflict
    snap = ledger.snapshot()
    v = snap.vehicle(VIN)
    assert v.batches == 1 and v.seq_conflicts == (1,) and v.duplicate_seqs == (1,)
    assert sum(snap.rejected.values()) == len(cases)
    assert v.rejected == {"bad_cbor": 2, "bad_status": 6, "vehicle_mismatch": 1}
    json.dumps(snap.to_json())  # the stats are plain JSON


def test_ledger_loss_reports_add_up_and_retained_copies_are_not_counted_twice() -> None:
    ledger = FleetLedger("vt", keep_records=0)
    report = json.dumps({"state": "online", "vehicle_id": VIN, "databases_replaced": 1,
                         "losses": {"event": {"rejected": {"batches": 0, "samples": 7}}}}).encode()
    topic = f"vt/{VIN}/status"
    ledger.ingest(topic, report, retained=True)  # first sight of the retained status: counted
    ledger.ingest(topic, report, retained=True)  # the same copy again on a re-subscribe
    ledger.ingest(topic, report)  # a new live report with the same amounts
    ledger.ingest(topic, b'{"state": "offline", "vehicle_id": "%s"}' % VIN.encode())
    v = ledger.snapshot().vehicle(VIN)
    assert v.reported_losses == {"event": {"rejected": {"batches": 0, "samples": 14}}}
    assert v.databases_replaced == 2 and v.state == "offline" and v.status_updates == 4
    ledger.ingest(topic, b"")  # retained status deleted
    assert ledger.snapshot().vehicle(VIN).status is None
    _ledger_batch(ledger, 3)
    assert ledger.vehicle(VIN) is not None and list(ledger.vehicle(VIN).records) == []  # type: ignore[union-attr]


def test_missing_is_bounded_for_an_absurd_seq() -> None:
    ledger = FleetLedger("vt")
    _ledger_batch(ledger, 1)
    _ledger_batch(ledger, 2**62)
    v = ledger.snapshot().vehicle(VIN)
    assert v.missing == 2**62 - 2 and v.missing_ranges == ((2, 2**62 - 1),)
    from simulator.backend import expand
    assert expand(v.missing_ranges, 5) == [2, 3, 4, 5, 6]

