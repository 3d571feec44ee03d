"""MQTT publisher against a real mosquitto with mutual TLS and an ACL.

Pure helpers (settings, backoff, rate limit, failure classification) are unit-tested at
the bottom; everything else runs against the broker from tests/broker.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from agent import pki
from agent.errors import ConfigError
from agent.uplink.broker_config import AclPolicy, BrokerConfig, write_broker_config
from agent.uplink.mqtt import (
    ConnectFailure,
    MqttPublisher,
    MqttSettings,
    TokenBucket,
    backoff_delay,
    check_tls_context,
    classify_lost_before_connack,
    status_payload,
)
from tests.broker import (
    OTHER_VEHICLE_ID,
    VEHICLE_ID,
    MosquittoBroker,
    Subscriber,
    make_dev_pki,
    wait_until,
)

WAIT = 30.0  # generous: the machine may be slow; never a pass/fail timing threshold
TELEMETRY = f"vt/{VEHICLE_ID}/telemetry"
EVENTS = f"vt/{VEHICLE_ID}/events"
STATUS = f"vt/{VEHICLE_ID}/status"


# ------------------------------------------------------------------ a tiny in-memory outbox


@dataclass(frozen=True)
class Batch:
    seq: int
    stream: str
    payload: bytes


class MemoryOutbox:
    """Shape of agent/outbox.py: pending(limit, exclude) and ack(seq). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Batch] = {}
        self._next = 1
        self.acked: list[int] = []
        self.open = threading.Event()  # closed: pending() returns nothing
        self.open.set()

    def add(self, stream: str, payload: bytes) -> int:
        with self._lock:
            seq = self._next
            self._next += 1
            self._pending[seq] = Batch(seq, stream, payload)
            return seq

    def fill(self, n: int, tag: str = "") -> list[bytes]:
        payloads = []
        for i in range(n):
            stream = "telemetry" if i % 3 else "events"
            payload = json.dumps({"tag": tag, "i": i}).encode()
            self.add(stream, payload)
            payloads.append(payload)
        return payloads

    def pending(self, limit: int, exclude: set[int]) -> list[Batch]:
        if not self.open.is_set():
            return []
        with self._lock:
            out = [b for seq, b in sorted(self._pending.items()) if seq not in exclude]
            return out[:limit]

    def ack_many(self, seqs: Sequence[int]) -> None:
        with self._lock:
            for seq in seqs:
                if seq not in self._pending:
                    raise AssertionError(f"ack of unknown or already acked seq {seq}")
                del self._pending[seq]
                self.acked.append(seq)

    def unacked(self) -> list[Batch]:
        with self._lock:
            return [b for _, b in sorted(self._pending.items())]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiDir:
    d = make_dev_pki(tmp_path_factory.mktemp("fleet"))
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    pki.issue_identity(d, "expired-vehicle", common_name=VEHICLE_ID, not_before=long_ago, days=1)
    pki.issue_identity(
        d, "broker-elsewhere", server=pki.ServerNames(dns=("mqtt.elsewhere.example",), ips=())
    )
    return d


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiDir:
    """Another CA, with a certificate for our vehicle id."""
    d = pki.PkiDir(tmp_path_factory.mktemp("foreign"))
    pki.init_ca(d, "Somebody Else's CA")
    pki.issue_identity(d, VEHICLE_ID)
    return d


@pytest.fixture(scope="module")
def broker(fleet: pki.PkiDir) -> Iterator[MosquittoBroker]:
    """Shared broker for tests that do not stop or reconfigure it."""
    with MosquittoBroker(fleet) as b:
        yield b


@pytest.fixture
def backend(broker: MosquittoBroker) -> Iterator[Subscriber]:
    sub = Subscriber(broker)
    yield sub
    sub.close()


def settings_for(broker: MosquittoBroker, fleet: pki.PkiDir, **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": fleet.ca_cert,
        "cert_file": fleet.cert(VEHICLE_ID),
        "key_file": fleet.key(VEHICLE_ID),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.4,
        "denied_retry_min_s": 0.05,
        "denied_retry_max_s": 0.2,
        "connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return MqttSettings(**values)


@pytest.fixture
def publishers() -> Iterator[list[MqttPublisher]]:
    """Publishers a test started; stopped at teardown even if the test fails."""
    started: list[MqttPublisher] = []
    yield started
    for p in started:
        p.stop()


def start(publishers: list[MqttPublisher], settings: MqttSettings, source: MemoryOutbox,
          **kwargs: Any) -> MqttPublisher:
    pub = MqttPublisher(settings, VEHICLE_ID, source, **kwargs)
    publishers.append(pub)
    pub.start()
    return pub


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publishes_acks_and_reports_status(
    broker: MosquittoBroker, fleet: pki.PkiDir, backend: Subscriber,
    publishers: list[MqttPublisher], protocol: str,
) -> None:
    outbox = MemoryOutbox()
    sent = outbox.fill(40, tag=f"e2e-{protocol}")
    pub = start(publishers, settings_for(broker, fleet, protocol=protocol, max_inflight=4),
                outbox)

    wait_until(lambda: len(outbox.acked) == 40, WAIT, "all batches acked")
    wait_until(lambda: len(backend.messages(TELEMETRY) + backend.messages(EVENTS)) >= 40,
               WAIT, "backend received everything")
    assert pub.connected
    assert outbox.acked == list(range(1, 41))
    assert outbox.unacked() == []
    telemetry = [p for i, p in enumerate(sent) if i % 3]
    events = [p for i, p in enumerate(sent) if not i % 3]
    # exactly the payloads, each on its stream's topic (QoS 1 may reorder only on resend)
    assert sorted(backend.payloads(TELEMETRY)) == sorted(telemetry)
    assert sorted(backend.payloads(EVENTS)) == sorted(events)
    c = pub.counters()
    assert (c.published, c.acked, c.denied, c.connects) == (40, 40, 0, 1)
    assert c.connect_failures == {} and c.disconnects == {}
    assert status_payload("online", VEHICLE_ID) in backend.payloads(STATUS)

    pub.stop()
    assert not pub.connected
    # The retained status now says offline, for anyone who subscribes later. (One
    # connection per identity: the broker binds client id to CN, so close the first.)
    backend.close()
    late = Subscriber(broker, topic=STATUS)
    try:
        wait_until(lambda: late.messages(STATUS) != [], WAIT, "retained status")
        status = late.messages(STATUS)[-1]
        assert status.retain
        assert json.loads(status.payload) == {"state": "offline", "vehicle_id": VEHICLE_ID}
    finally:
        late.close()


def test_rate_limit_per_stream(
    broker: MosquittoBroker, fleet: pki.PkiDir, backend: Subscriber,
    publishers: list[MqttPublisher],
) -> None:
    clock = FakeClock()
    outbox = MemoryOutbox()
    for i in range(10):
        outbox.add("telemetry", f"t{i}".encode())
    for i in range(4):
        outbox.add("events", f"e{i}".encode())
    pub = start(publishers, settings_for(broker, fleet, max_publishes_per_s=3.0), outbox,
                clock=clock)

    # with the clock frozen each stream gets its burst of 3, no more
    wait_until(lambda: len(outbox.acked) == 6, WAIT, "the first burst")
    wait_until(lambda: pub.counters().rate_limited >= 20, WAIT, "the loop to keep deferring")
    assert pub.counters().published == 6
    streams = {b.stream for b in outbox.unacked()}
    assert [b.stream for b in outbox.unacked()].count("telemetry") == 7
    assert streams == {"telemetry", "events"}

    clock.now += 1.0  # one second later: 3 more tokens per stream
    wait_until(lambda: len(outbox.acked) == 10, WAIT, "the second burst")
    wait_until(lambda: pub.counters().rate_limited >= 40, WAIT, "deferring again")
    assert pub.counters().published == 10
    assert [b.stream for b in outbox.unacked()] == ["telemetry"] * 4


# ------------------------------------------------------------------ TLS failures


def _assert_keeps_failing(pub: MqttPublisher, outbox: MemoryOutbox, cause: str,
                          backend: Subscriber | None) -> ConnectFailure:
    wait_until(lambda: pub.counters().connect_failures.get(cause, 0) >= 3, WAIT,
               f"three {cause} failures (attempts continue with backoff)")
    c = pub.counters()
    assert c.connect_attempts >= 3
    assert c.connects == 0 and c.published == 0 and c.acked == 0
    assert set(c.connect_failures) == {cause}, c.connect_failures
    assert not pub.connected
    assert len(outbox.unacked()) == 5 and outbox.acked == []
    if backend is not None:
        assert backend.messages(TELEMETRY) == [] and backend.messages(EVENTS) == []
    failure = pub.last_failure
    assert failure is not None and failure.cause == cause
    return failure


def _five() -> MemoryOutbox:
    outbox = MemoryOutbox()
    outbox.fill(5, tag="must-not-arrive")
    return outbox


def test_broker_from_an_unknown_ca_is_refused(
    broker: MosquittoBroker, fleet: pki.PkiDir, foreign: pki.PkiDir, backend: Subscriber,
    publishers: list[MqttPublisher],
) -> None:
    outbox = _five()
    pub = start(publishers, settings_for(broker, fleet, ca_file=foreign.ca_cert), outbox)
    failure = _assert_keeps_failing(pub, outbox, "broker_cert_untrusted", backend)
    assert failure.detail.startswith("broker certificate verify failed: unknown CA")
    assert "OpenSSL Error[0]: error:0A000418:SSL routines::tlsv1 alert unknown ca" in (
        broker.log_text()
    )


def test_broker_certificate_for_another_host_is_refused(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    with MosquittoBroker(fleet, server_identity="broker-elsewhere") as elsewhere:
        outbox = _five()
        pub = start(publishers, settings_for(elsewhere, fleet), outbox)
        failure = _assert_keeps_failing(pub, outbox, "broker_hostname_mismatch", None)
        assert "not valid for '127.0.0.1'" in failure.detail
        elsewhere.wait_for_log("sslv3 alert bad certificate")
        pub.stop()


def test_expired_client_certificate_is_rejected_by_the_broker(
    broker: MosquittoBroker, fleet: pki.PkiDir, backend: Subscriber,
    publishers: list[MqttPublisher],
) -> None:
    outbox = _five()
    settings = settings_for(broker, fleet, cert_file=fleet.cert("expired-vehicle"),
                            key_file=fleet.key("expired-vehicle"))
    pub = start(publishers, settings, outbox)
    failure = _assert_keeps_failing(pub, outbox, "client_cert_rejected", backend)
    assert failure.detail.startswith("broker rejected our client certificate")
    assert "our certificate expired at" in failure.detail
    broker.wait_for_log("SSL routines::certificate verify failed")


def test_client_certificate_from_another_ca_is_rejected(
    broker: MosquittoBroker, fleet: pki.PkiDir, foreign: pki.PkiDir, backend: Subscriber,
    publishers: list[MqttPublisher],
) -> None:
    outbox = _five()
    settings = settings_for(broker, fleet, cert_file=foreign.cert(VEHICLE_ID),
                            key_file=foreign.key(VEHICLE_ID))
    pub = start(publishers, settings, outbox)
    failure = _assert_keeps_failing(pub, outbox, "client_cert_rejected", backend)
    assert failure.detail.startswith("broker rejected our client certificate")
    broker.wait_for_log("SSL routines::certificate verify failed")


def test_missing_client_certificate_is_rejected(
    broker: MosquittoBroker, fleet: pki.PkiDir, backend: Subscriber,
    publishers: list[MqttPublisher],
) -> None:
    # The settings cannot express "no certificate"; a context without one can.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(fleet.ca_cert))
    outbox = _five()
    pub = start(publishers, settings_for(broker, fleet), outbox, tls_context=ctx)
    failure = _assert_keeps_failing(pub, outbox, "client_cert_rejected", backend)
    assert failure.detail.startswith("broker rejected our client certificate")
    broker.wait_for_log("SSL routines::peer did not return a certificate")


def test_broker_refusing_the_connect_is_classified(
    broker: MosquittoBroker, fleet: pki.PkiDir, tmp_path: Path,
    publishers: list[MqttPublisher],
) -> None:
    """A fleet certificate without a CN passes TLS, but mosquitto has no username for it
    and answers CONNACK 0x86. (Our own settings could never load such a certificate.)"""
    ca_key, ca_cert = fleet.load_ca()
    key = pki.generate_private_key()
    now = dt.datetime.now(dt.UTC)
    nameless = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no CN")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    pki.write_private_key(tmp_path / "n.key", key)
    pki.write_certificate(tmp_path / "n.crt", nameless)
    ctx = broker.tls_context(identity=None)
    ctx.load_cert_chain(str(tmp_path / "n.crt"), str(tmp_path / "n.key"))
    outbox = _five()
    pub = start(publishers, settings_for(broker, fleet), outbox, tls_context=ctx)
    failure = _assert_keeps_failing(pub, outbox, "connack_refused", None)
    assert failure.detail == (
        "broker refused the connection: Bad user name or password (0x86)"
    )


# ------------------------------------------------------------------ ACL


def test_publish_denied_by_acl_is_not_acked_and_is_retried(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    # A broker whose ACL forgot the telemetry stream.
    acl = AclPolicy(vehicle_write=("{root}/%u/status", "{root}/%u/events"))
    with MosquittoBroker(fleet, acl=acl) as strict:
        backend = Subscriber(strict)
        try:
            outbox = MemoryOutbox()
            t1 = outbox.add("telemetry", b"denied-1")
            e1 = outbox.add("events", b"allowed-1")
            t2 = outbox.add("telemetry", b"denied-2")
            e2 = outbox.add("events", b"allowed-2")
            pub = start(publishers, settings_for(strict, fleet), outbox)
            wait_until(lambda: sorted(outbox.acked) == [e1, e2], WAIT, "events acked")
            wait_until(lambda: pub.counters().denied >= 6, WAIT, "denied publishes retried")
            assert [b.seq for b in outbox.unacked()] == [t1, t2]
            c = pub.counters()
            assert c.acked == 2 and c.published == c.acked + c.denied + len(pub.inflight_seqs())
            assert pub.connected and c.connects == 1 and c.disconnects == {}
            wait_until(lambda: len(backend.messages(EVENTS)) == 2, WAIT, "events delivered")
            assert backend.messages(TELEMETRY) == []
        finally:
            backend.close()


def test_misconfigured_prefix_publishes_are_denied_with_v5(
    broker: MosquittoBroker, fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    """Publishing under another vehicle's topic: 0x87 Not authorized, nothing acked."""
    outbox = _five()
    settings = settings_for(broker, fleet, topic_prefix=f"vt/{OTHER_VEHICLE_ID}")
    pub = start(publishers, settings, outbox)
    wait_until(lambda: pub.counters().denied >= 10, WAIT, "denials and retries")
    assert outbox.acked == [] and len(outbox.unacked()) == 5
    assert pub.counters().acked == 0


def test_v311_cannot_see_acl_denials(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    """Documents the 3.1.1 limitation: mosquitto PUBACKs a denied publish and drops it."""
    acl = AclPolicy(vehicle_write=("{root}/%u/status",))
    with MosquittoBroker(fleet, acl=acl) as strict:
        backend = Subscriber(strict)
        try:
            outbox = MemoryOutbox()
            outbox.add("telemetry", b"silently-dropped")
            pub = start(publishers, settings_for(strict, fleet, protocol="3.1.1"), outbox)
            wait_until(lambda: outbox.acked == [1], WAIT, "the (mistaken) ack")
            assert pub.counters().denied == 0
            # The status message (allowed) arrives; the denied batch never does.
            wait_until(lambda: backend.messages(STATUS) != [], WAIT, "status")
            assert backend.messages(TELEMETRY) == []
        finally:
            backend.close()


# ------------------------------------------------------------------ identity takeover


class Impostor:
    """Another vehicle's certificate, presenting our vehicle id as its client id."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=VEHICLE_ID,
            protocol=paho.MQTTv5,
        )
        self.client.tls_set_context(broker.tls_context(OTHER_VEHICLE_ID))
        self.connected = threading.Event()
        self.acks: list[int] = []
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_publish = lambda c, u, mid, rc, props: self.acks.append(rc.value)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_impostor_with_our_client_id_cannot_take_over_the_session(
    broker: MosquittoBroker, fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    outbox = MemoryOutbox()
    outbox.fill(3, tag="before")
    pub = start(publishers, settings_for(broker, fleet), outbox)
    wait_until(lambda: len(outbox.acked) == 3, WAIT, "first batches")

    impostor = Impostor(broker)
    try:
        # use_username_as_clientid: mosquitto renamed the impostor to its own CN.
        broker.wait_for_log(f"as {OTHER_VEHICLE_ID} (p5, c1, k30, u'{OTHER_VEHICLE_ID}')")
        impostor.client.publish(TELEMETRY, b"forged", qos=1)
        wait_until(lambda: impostor.acks != [], WAIT, "impostor's PUBACK")
        assert impostor.acks == [0x87]  # Not authorized: it is not us

        outbox.fill(3, tag="after")
        wait_until(lambda: len(outbox.acked) == 6, WAIT, "batches after the impostor came")
        c = pub.counters()
        assert pub.connected and c.connects == 1 and c.disconnects == {}
        assert f"Client {VEHICLE_ID} already connected" not in broker.log_text()
    finally:
        impostor.close()


def test_without_client_id_binding_mosquitto_lets_an_impostor_kick_us(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    """Why broker_config sets use_username_as_clientid: without it, mosquitto 2.0.11
    closes the real vehicle's connection (no DISCONNECT reason is sent) when another
    certificate connects with its client id. The publisher records the loss, reconnects
    (which ends the impostor's session in turn) and carries on."""
    with MosquittoBroker(fleet, bind_client_id=False) as loose:
        outbox = MemoryOutbox()
        pub = start(publishers, settings_for(loose, fleet), outbox)
        wait_until(lambda: pub.connected, WAIT, "connected")
        impostor = Impostor(loose)
        try:
            loose.wait_for_log(f"Client {VEHICLE_ID} already connected, closing old connection.")
            loose.wait_for_log(f"as {VEHICLE_ID} (p5, c1, k30, u'{OTHER_VEHICLE_ID}')")
            wait_until(lambda: pub.counters().connects >= 2, WAIT, "our reconnect")
            lost = pub.counters().disconnects
            assert lost.get("connection_lost", 0) >= 1, lost
        finally:
            impostor.close()
        outbox.fill(3)
        wait_until(lambda: len(outbox.acked) == 3, WAIT, "publishing after reconnecting")
        pub.stop()


# ------------------------------------------------------------------ broker outages


def test_broker_restart_reconnects_and_drains(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    with MosquittoBroker(fleet) as b:
        backend = Subscriber(b)
        try:
            outbox = MemoryOutbox()
            before = outbox.fill(5, tag="before")
            pub = start(publishers, settings_for(b, fleet, reconnect_max_s=0.5), outbox)
            wait_until(lambda: len(outbox.acked) == 5, WAIT, "first batches")

            b.stop()
            wait_until(lambda: not pub.connected and not backend.subscribed.is_set(), WAIT,
                       "both clients to notice")
            during = outbox.fill(7, tag="while-down")  # keeps buffering while disconnected
            wait_until(
                lambda: pub.counters().connect_failures.get("connection_refused", 0) >= 2,
                WAIT, "reconnect attempts while the broker is down",
            )
            assert len(outbox.unacked()) == 7
            assert "connection_lost" in pub.counters().disconnects

            outbox.open.clear()  # hold the data until the backend has re-subscribed
            b.start()
            wait_until(lambda: pub.connected and backend.subscribed.is_set(), WAIT,
                       "both clients back")
            outbox.open.set()
            wait_until(lambda: len(outbox.acked) == 12, WAIT, "the outbox to drain")
            wait_until(lambda: len(backend.messages(TELEMETRY) + backend.messages(EVENTS)) >= 12,
                       WAIT, "delivery")
            got = backend.payloads(TELEMETRY) + backend.payloads(EVENTS)
            assert sorted(set(got)) == sorted(before + during)
            assert pub.counters().connects == 2
        finally:
            backend.close()


def test_inflight_batches_are_resent_after_a_broker_crash(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    with MosquittoBroker(fleet) as b:
        outbox = MemoryOutbox()
        pub = start(publishers, settings_for(b, fleet, max_inflight=4), outbox)
        wait_until(lambda: pub.connected, WAIT, "connected")

        b.pause()  # hung broker: accepts bytes, answers nothing
        outbox.fill(6, tag="in-flight")
        wait_until(lambda: len(pub.inflight_seqs()) == 4, WAIT, "a full in-flight window")
        assert outbox.acked == []
        assert pub.inflight_seqs() == {1, 2, 3, 4}  # bounded window; 5 and 6 wait
        b.kill()
        wait_until(lambda: not pub.connected, WAIT, "the connection to drop")
        b.start()
        backend = Subscriber(b)
        try:
            wait_until(lambda: len(outbox.acked) == 6, WAIT, "re-sent and acked")
            assert sorted(outbox.acked) == [1, 2, 3, 4, 5, 6]
            assert pub.counters().acked == 6
        finally:
            backend.close()


def test_hung_broker_trips_puback_timeout_and_the_will_says_offline(
    fleet: pki.PkiDir, publishers: list[MqttPublisher]
) -> None:
    with MosquittoBroker(fleet) as b:
        backend = Subscriber(b, topic=STATUS)
        try:
            outbox = MemoryOutbox()
            pub = start(publishers, settings_for(b, fleet, puback_timeout_s=1.0), outbox)
            wait_until(lambda: pub.connected, WAIT, "connected")
            wait_until(lambda: backend.messages(STATUS) != [], WAIT, "online status")
            b.pause()
            outbox.fill(2, tag="stuck")
            wait_until(lambda: "puback_timeout" in pub.counters().disconnects, WAIT,
                       "the PUBACK timeout")
            b.resume()
            offline = status_payload("offline", VEHICLE_ID)
            wait_until(lambda: offline in backend.payloads(STATUS), WAIT, "the Last Will")
            wait_until(lambda: len(outbox.acked) == 2, WAIT, "re-sent after reconnecting")
            wait_until(lambda: backend.payloads(STATUS)[-1] == status_payload("online", VEHICLE_ID),
                       WAIT, "online again")
        finally:
            backend.close()


# ------------------------------------------------------------------ refusing to start


def test_refuses_a_certificate_for_another_vehicle(
    broker: MosquittoBroker, fleet: pki.PkiDir
) -> None:
    settings = settings_for(broker, fleet, cert_file=fleet.cert(OTHER_VEHICLE_ID),
                            key_file=fleet.key(OTHER_VEHICLE_ID))
    with pytest.raises(ConfigError) as err:
        MqttPublisher(settings, VEHICLE_ID, MemoryOutbox())
    message = str(err.value)
    assert f"certificate CN is '{OTHER_VEHICLE_ID}'" in message
    assert f"vehicle id is '{VEHICLE_ID}'" in message


def test_refuses_a_readable_private_key(
    broker: MosquittoBroker, fleet: pki.PkiDir, tmp_path: Path
) -> None:
    key = tmp_path / "vehicle.key"
    key.write_bytes(fleet.key(VEHICLE_ID).read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"chmod 600 {key}"):
        MqttPublisher(settings_for(broker, fleet, key_file=key), VEHICLE_ID, MemoryOutbox())


def test_refuses_mismatched_key_and_missing_files(
    broker: MosquittoBroker, fleet: pki.PkiDir, tmp_path: Path
) -> None:
    settings = settings_for(broker, fleet, key_file=fleet.key(OTHER_VEHICLE_ID))
    with pytest.raises(ConfigError, match="do not belong together"):
        MqttPublisher(settings, VEHICLE_ID, MemoryOutbox())
    with pytest.raises(ConfigError, match="CA file does not exist"):
        MqttPublisher(settings_for(broker, fleet, ca_file=tmp_path / "nope.crt"), VEHICLE_ID,
                      MemoryOutbox())


def test_refuses_a_tls_context_that_does_not_verify_the_broker() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    check_tls_context(ctx)
    ctx.check_hostname = False
    with pytest.raises(ConfigError, match="does not check the broker's host name"):
        check_tls_context(ctx)
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ConfigError, match="does not require a verified broker certificate"):
        check_tls_context(ctx)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.warns(DeprecationWarning):
        old.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.raises(ConfigError, match=r"older than 1\.2"):
        check_tls_context(old)


# ------------------------------------------------------------------ broker config


def test_broker_config_refuses_a_directory_mosquitto_cannot_enter(
    fleet: pki.PkiDir, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("privileges are only dropped when mosquitto starts as root")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=rf"cannot enter {locked}"):
        write_broker_config(locked / "broker", BrokerConfig(port=1883),
                            ca_cert=fleet.ca_cert, broker_cert=fleet.cert("broker"),
                            broker_key=fleet.key("broker"))


def test_broker_config_files(broker: MosquittoBroker) -> None:
    conf = broker.files.conf.read_text().splitlines()
    for line in ["allow_anonymous false", f"listener {broker.port} 127.0.0.1",
                 "tls_version tlsv1.2", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 "persistence false"]:
        assert line in conf
    assert broker.files.acl.read_text().splitlines()[2:] == [
        "pattern write vt/%u/#",
        "pattern read vt/%u/cmd/#",
        "",
        "user backend",
        "topic read vt/#",
        "topic write vt/+/cmd/#",
    ]
    assert stat.S_IMODE(broker.files.key.stat().st_mode) == 0o600


# ------------------------------------------------------------------ pure helpers


def _settings(**kw: Any) -> MqttSettings:
    return MqttSettings(host="h", ca_file=Path("ca"), cert_file=Path("c"), key_file=Path("k"),
                        **kw)


def test_settings_defaults_and_validation() -> None:
    s = _settings()
    assert (s.port, s.protocol, s.topic_prefix) == (8883, "5", "vt")
    bad_values: list[dict[str, Any]] = [{"tls_insecure": True}, {"topic_prefix": "vt/#"}, {"topic_prefix": "vt//x"},
                {"topic_prefix": "/vt"}, {"topic_prefix": "$SYS"}, {"protocol": "3.1"},
                {"max_inflight": 0}, {"reconnect_min_s": 5, "reconnect_max_s": 1},
                {"max_publishes_per_s": 0}]
    for bad in bad_values:
        with pytest.raises(ValidationError):
            _settings(**bad)
    assert _settings(topic_prefix="fleet/eu").topic_prefix == "fleet/eu"


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)]:
        assert backoff_delay(attempt, 1.0, 60.0, lambda: 0.0) == base / 2
        assert backoff_delay(attempt, 1.0, 60.0, lambda: 1.0) == base


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, capacity=2.0, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.try_take(0.25) is False  # half a token
    assert bucket.try_take(0.5) is True
    assert bucket.try_take(100.0) and bucket.try_take(100.0) and not bucket.try_take(100.0)
    assert bucket.try_take(99.0) is False  # a clock going backwards adds nothing


@pytest.mark.parametrize(
    ("log_line", "cause", "text"),
    [
        ("failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert "
         "certificate required (_ssl.c:2580)", "client_cert_rejected", "we presented no"),
        ("failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert "
         "certificate expired (_ssl.c:2580)", "client_cert_rejected", "has expired"),
        ("failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)",
         "client_cert_rejected", "TLS 1.3"),
        ("failed to receive on socket: [Errno 104] Connection reset by peer",
         "closed_before_connack", "Connection reset"),
        (None, "closed_before_connack", "before CONNACK"),
    ],
)
def test_classify_lost_before_connack(log_line: str | None, cause: str, text: str) -> None:
    failure = classify_lost_before_connack(log_line)
    assert failure.cause == cause
    assert text in failure.detail
