"""MQTT publisher: stored batches -> broker over mutual TLS, acked only on PUBACK success.

The publisher pulls batches from a :class:`BatchSource` (the SQLite outbox), publishes at
most ``max_inflight`` at a time with QoS 1 and calls ``source.ack(seq)`` only when the
broker answered with a PUBACK whose reason code is a success (< 0x80). A refused publish
(MQTT v5, e.g. 0x87 Not authorized from the broker's ACL) stays in the outbox and is
retried later with backoff.

Limitation of MQTT 3.1.1: the protocol's PUBACK carries no reason code, and mosquitto
answers a publish denied by its ACL with a normal PUBACK and silently drops the message.
With ``protocol: "3.1.1"`` such batches are acked and lost; use MQTT v5 (the default).

Connection handling: one paho client, driven by :meth:`MqttPublisher.run` on its own
thread (no paho background thread). Connection attempts back off exponentially with
jitter; failures are classified into a stable cause (``broker_cert_untrusted``,
``client_cert_rejected``, ...) with a sentence a person can act on, counted and logged,
and never end the loop. While disconnected nothing is pulled; batches keep accumulating
in the outbox. Messages in flight when a connection drops are re-sent by paho after the
next CONNACK (QoS 1 at-least-once: the backend deduplicates on ``seq``).

TLS is always verified: TLS >= 1.2, the fleet CA, and the broker's host name. There is
deliberately no option to turn hostname checks off.
"""

from __future__ import annotations

import json
import queue
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import paho.mqtt.client as paho
import structlog
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import ConfigError, RejectedInput
from agent.pki import check_private_key_file, common_name, load_certificate, validate_vehicle_id

log = structlog.get_logger(__name__)

DATA_STREAMS = ("telemetry", "events", "cmd/res")
STATUS = "status"
QOS = 1
# A session that stayed up this long counts as healthy: the reconnect backoff restarts
# from the minimum. Shorter sessions keep growing it, so a flapping link backs off.
STABLE_SESSION_S = 30.0
# How long the loop waits in select() when idle: bounds the latency between a batch
# landing in the outbox and being published.
POLL_S = 0.1
# On shutdown, how long to wait for the broker to acknowledge the "offline" status.
OFFLINE_ACK_WAIT_S = 2.0


# --------------------------------------------------------------------------- settings


class MqttSettings(BaseModel):
    """The ``mqtt:`` section of the agent configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(8883, ge=1, le=65535)
    ca_file: Path
    cert_file: Path
    key_file: Path
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(60, ge=5, le=65535)
    connect_timeout_s: float = Field(10.0, gt=0)
    topic_prefix: str = "vt"
    max_inflight: int = Field(16, ge=1, le=65535)
    max_publishes_per_s: float = Field(50.0, gt=0, description="per stream")
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(120.0, gt=0)
    denied_retry_min_s: float = Field(5.0, gt=0)
    denied_retry_max_s: float = Field(600.0, gt=0)
    puback_timeout_s: float = Field(60.0, gt=0)
    session_expiry_s: int = Field(86_400, ge=0, description="how long the broker keeps command "
                                  "requests for this vehicle while it is offline (MQTT v5)")
    status_interval_s: float = Field(60.0, gt=0, description="how often the retained status is refreshed")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_levels(cls, value: str) -> str:
        levels = value.split("/")
        if not value or any(not lvl for lvl in levels):
            raise ValueError("must be one or more non-empty topic levels joined by '/'")
        if any(ch in value for ch in "+#\x00"):
            raise ValueError("must not contain MQTT wildcards '+' or '#'")
        if value.startswith("$"):
            raise ValueError("must not start with '$' (reserved for broker topics)")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> MqttSettings:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        if self.denied_retry_min_s > self.denied_retry_max_s:
            raise ValueError("denied_retry_min_s must not exceed denied_retry_max_s")
        return self


@dataclass(frozen=True)
class Topics:
    """Where one vehicle publishes: ``{prefix}/{vehicle_id}/{stream}``."""

    prefix: str
    vehicle_id: str

    def stream(self, name: str) -> str:
        return f"{self.prefix}/{self.vehicle_id}/{name}"

    @property
    def status(self) -> str:
        return self.stream(STATUS)


def status_payload(state: Literal["online", "offline"], vehicle_id: str,
                   fields: Mapping[str, object] | None = None) -> bytes:
    """Retained JSON on the status topic; small enough to read with mosquitto_sub."""
    body = {**(fields or {}), "state": state, "vehicle_id": vehicle_id}
    return json.dumps(body, sort_keys=True).encode()


# --------------------------------------------------------------------------- identity / TLS


def build_tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Client context: TLS >= 1.2, CA-verified, hostname-checked, with our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(settings.ca_file))
    except FileNotFoundError:
        raise ConfigError.single(str(settings.ca_file), "CA file does not exist") from None
    except ssl.SSLError as exc:
        raise ConfigError.single(
            str(settings.ca_file), f"CA file holds no usable PEM certificate: {exc.reason}"
        ) from None
    try:
        ctx.load_cert_chain(certfile=str(settings.cert_file), keyfile=str(settings.key_file))
    except FileNotFoundError as exc:
        raise ConfigError.single(str(exc.filename), "file does not exist") from None
    except ssl.SSLError as exc:
        message = (
            "certificate and private key do not belong together"
            if "KEY_VALUES_MISMATCH" in str(exc)
            else f"cannot load client certificate/key: {exc.reason or exc}"
        )
        raise ConfigError.single(str(settings.cert_file), message) from None
    return ctx


def check_tls_context(ctx: ssl.SSLContext) -> None:
    """Refuse a context that would not verify the broker (the security floor)."""
    problems = []
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        problems.append("it does not require a verified broker certificate")
    if not ctx.check_hostname:
        problems.append("it does not check the broker's host name")
    if ctx.minimum_version < ssl.TLSVersion.TLSv1_2:
        problems.append("it allows TLS older than 1.2")
    if problems:
        raise ConfigError.single("<tls context>", "unsafe TLS context: " + "; ".join(problems))


def check_identity(settings: MqttSettings, vehicle_id: str) -> x509.Certificate:
    """Refuse to start unless key permissions are safe and the certificate is ours.

    The broker takes our identity from the certificate CN, so a CN other than our
    vehicle id would make us publish as, or be refused as, another vehicle.
    """
    try:
        validate_vehicle_id(vehicle_id)
    except RejectedInput as exc:
        raise ConfigError.single("<agent config>", exc.detail, path="vehicle_id") from None
    check_private_key_file(settings.key_file)
    cert = load_certificate(settings.cert_file)
    cn = common_name(cert.subject)
    if cn != vehicle_id:
        raise ConfigError.single(
            str(settings.cert_file),
            f"certificate CN is {cn!r} but this agent's vehicle id is {vehicle_id!r}; the "
            "broker identifies the vehicle by the CN, so they must be equal. Issue a "
            f"certificate for {vehicle_id} (telematics-agent pki vehicle-key / sign-csr).",
        )
    return cert


def _certificate_expiry_note(cert: x509.Certificate, now: float) -> str:
    if cert.not_valid_after_utc.timestamp() < now:
        return f"; our certificate expired at {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc.timestamp() > now:
        return (
            f"; our certificate is valid only from {cert.not_valid_before_utc.isoformat()}"
            " (is the vehicle clock right?)"
        )
    return ""


# --------------------------------------------------------------------------- failure causes


@dataclass(frozen=True)
class ConnectFailure:
    """Why a connection failed or ended: a stable ``cause`` code and a sentence."""

    cause: str
    detail: str


_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21}  # X509_V_ERR_* "issuer not found / self-signed"
_HOSTNAME_CODES = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "we presented no certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "our certificate is not from a CA the broker trusts",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "our certificate is revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV1_ALERT_DECRYPT_ERROR": "certificate signature check failed",
}
_SSL_REASON_RE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")


def classify_tls_alert(reason: str) -> ConnectFailure | None:
    """Map an OpenSSL reason (e.g. ``TLSV1_ALERT_UNKNOWN_CA``) to a failure, if it is one."""
    if reason in _CLIENT_CERT_ALERTS:
        return ConnectFailure(
            "client_cert_rejected",
            f"broker rejected our client certificate ({_CLIENT_CERT_ALERTS[reason]}; "
            f"TLS alert {reason})",
        )
    if "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
        return ConnectFailure(
            "tls_version", f"no TLS version in common with the broker (need >= 1.2; {reason})"
        )
    return None


def classify_connect_error(exc: BaseException, host: str, port: int) -> ConnectFailure:
    """Turn an exception from TCP connect + TLS handshake into a cause."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, message = exc.verify_code, exc.verify_message
        if code in _UNKNOWN_CA_CODES:
            return ConnectFailure(
                "broker_cert_untrusted",
                f"broker certificate verify failed: unknown CA ({message}); the broker's "
                "certificate is not signed by the CA in ca_file",
            )
        if code in _HOSTNAME_CODES:
            return ConnectFailure(
                "broker_hostname_mismatch",
                f"broker certificate verify failed: it is not valid for {host!r} ({message})",
            )
        if code == 10:
            return ConnectFailure(
                "broker_cert_expired", "broker certificate verify failed: certificate has expired"
            )
        if code == 9:
            return ConnectFailure(
                "broker_cert_not_yet_valid",
                "broker certificate verify failed: not yet valid (is the vehicle clock right?)",
            )
        return ConnectFailure("broker_cert_invalid", f"broker certificate verify failed: {message}")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        known = classify_tls_alert(reason)
        if known is not None:
            return known
        if isinstance(exc, ssl.SSLEOFError):
            return ConnectFailure(
                "tls_closed", "broker closed the connection during the TLS handshake"
            )
        return ConnectFailure("tls_error", f"TLS handshake failed: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailure(
            "connection_refused", f"nothing accepts connections at {host}:{port}"
        )
    if isinstance(exc, TimeoutError):
        return ConnectFailure("timeout", f"connecting to {host}:{port} timed out")
    if isinstance(exc, OSError) and exc.__class__.__name__ == "gaierror":
        return ConnectFailure("dns", f"cannot resolve {host!r}: {exc}")
    if isinstance(exc, OSError):
        return ConnectFailure("network", f"cannot reach {host}:{port}: {exc}")
    return ConnectFailure("connect_error", f"{type(exc).__name__}: {exc}")


def classify_lost_before_connack(socket_error: str | None) -> ConnectFailure:
    """The TLS handshake succeeded but the connection ended before a CONNACK.

    With TLS 1.3 the client finishes its handshake before the server has checked the
    client certificate, so a rejected certificate arrives as an alert on the first read
    or as the server closing the connection.
    """
    if socket_error:
        match = _SSL_REASON_RE.search(socket_error)
        if match:
            known = classify_tls_alert(match.group(1))
            if known is not None:
                return known
        if "EOF occurred in violation of protocol" in socket_error or "UNEXPECTED_EOF" in (
            socket_error
        ):
            return ConnectFailure(
                "client_cert_rejected",
                "broker rejected our client certificate (it aborted the TLS connection "
                "before CONNACK, which is how TLS 1.3 shows a refused or missing client "
                "certificate)",
            )
        return ConnectFailure("closed_before_connack", f"connection lost before CONNACK: {socket_error}")
    return ConnectFailure(
        "closed_before_connack",
        "broker closed the connection before CONNACK (a refused client certificate or an "
        "overloaded broker)",
    )


def _lost_detail(socket_error: str | None, reason: ReasonCode | None = None) -> str:
    if socket_error:
        return f"connection lost: {socket_error}"
    if reason is not None and reason.value not in (0, 0x80):  # e.g. Keep alive timeout
        return f"connection lost: {reason}"
    # mosquitto 2.0 closes without a DISCONNECT reason when it shuts down and when another
    # client connects with our client id.
    return (
        "broker closed the connection without a reason (broker shutdown, or another client "
        "connected with our client id)"
    )


# --------------------------------------------------------------------------- pure helpers


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with 'equal jitter': uniform in [d/2, d], d = min*2^(attempt-1)."""
    base = min(maximum, minimum * 2.0 ** min(max(attempt - 1, 0), 32))
    return base / 2.0 + rng() * base / 2.0


class TokenBucket:
    """At most ``rate`` takes per second on average, bursts of up to ``capacity``."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = now

    def try_take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- source protocol


class StoredBatch(Protocol):
    """One encoded batch waiting in the outbox."""

    @property
    def seq(self) -> int: ...

    @property
    def stream(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class CommandInbox(Protocol):
    """Receives command requests (``{prefix}/{vehicle}/cmd/req/+``) from the publisher's thread.

    ``deliver`` must return quickly; it calls ``ack`` (from any thread) once the request is
    durably accepted or rejected, and only then does the broker drop it. A request not acked
    before a crash is redelivered on the next session.
    """

    def deliver(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None: ...


class StatusSource(Protocol):
    """Extra fields for the online status (e.g. the outbox's loss report).

    ``status_report`` returns the fields and a token; ``status_delivered(token)`` is called
    once the broker acknowledged a status message carrying them, so counts reported upstream
    can be cleared exactly once.
    """

    def status_report(self) -> tuple[dict[str, object], object]: ...

    def status_delivered(self, token: object) -> None: ...


class BatchSource(Protocol):
    """Where the publisher gets batches (the outbox). Called from the publisher's thread."""

    def pending(self, limit: int, *, exclude: set[int]) -> Sequence[StoredBatch]:
        """Up to ``limit`` un-acked batches to send next, skipping the seqs in ``exclude``."""
        ...

    def ack_many(self, seqs: Sequence[int]) -> object:
        """The broker has these batches; they may be deleted (the result is ignored)."""
        ...


# --------------------------------------------------------------------------- publisher


@dataclass
class PublisherCounters:
    """What the publisher did since it started; a snapshot is returned by ``counters()``."""

    published: int = 0
    acked: int = 0
    denied: int = 0
    rate_limited: int = 0
    unpublishable: int = 0
    source_errors: int = 0
    connect_attempts: int = 0
    connects: int = 0
    connect_failures: dict[str, int] = field(default_factory=dict)
    disconnects: dict[str, int] = field(default_factory=dict)


@dataclass
class _InFlight:
    seq: int
    topic: str
    sent_at: float


@dataclass
class _Retry:
    attempts: int
    due: float


@dataclass
class _Session:
    """State of one connection attempt, from connect() to its end."""

    deadline: float
    established: bool = False
    started_at: float = 0.0
    closed: bool = False
    end: ConnectFailure | None = None
    socket_error: str | None = None
    status_mid: int | None = None
    status_token: object = None
    status_sent_at: float = 0.0


class MqttPublisher:
    """Publishes outbox batches for one vehicle; run :meth:`run` on a dedicated thread."""

    def __init__(
        self,
        settings: MqttSettings,
        vehicle_id: str,
        source: BatchSource,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        tls_context: ssl.SSLContext | None = None,
        status: StatusSource | None = None,
        inbox: CommandInbox | None = None,
    ) -> None:
        """``tls_context`` replaces the one built from the settings' files (for keys held
        elsewhere, e.g. in a TPM); it must still verify the broker fully."""
        self.settings = settings
        self.vehicle_id = vehicle_id
        self.topics = Topics(settings.topic_prefix, vehicle_id)
        self._certificate = check_identity(settings, vehicle_id)
        self._tls = tls_context or build_tls_context(settings)
        check_tls_context(self._tls)
        self._source = source
        self._status = status
        self._inbox = inbox
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._acked: list[int] = []
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._counters = PublisherCounters()
        self._last_failure: ConnectFailure | None = None
        self._session: _Session | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._retry: dict[int, _Retry] = {}
        self._unpublishable: set[int] = set()
        self._buckets: dict[str, TokenBucket] = {}
        self._window = settings.max_inflight
        self._failures = 0
        self._next_connect_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = self._make_client()
        note = _certificate_expiry_note(self._certificate, time.time())
        if note:
            log.warning("client certificate not currently valid", detail=note.lstrip("; "))

    # -- public surface

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.established and not session.closed

    @property
    def last_failure(self) -> ConnectFailure | None:
        """The most recent connect failure or disconnect cause."""
        return self._last_failure

    def counters(self) -> PublisherCounters:
        with self._lock:
            return replace(
                self._counters,
                connect_failures=dict(self._counters.connect_failures),
                disconnects=dict(self._counters.disconnects),
            )

    def inflight_seqs(self) -> set[int]:
        return {f.seq for f in list(self._inflight.values())}

    def start(self) -> None:
        """Run the publisher on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name=f"mqtt-{self.vehicle_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self, stop: threading.Event) -> None:
        """Connect, publish and reconnect until ``stop`` is set; then go offline cleanly."""
        try:
            while not stop.is_set():
                session = self._session
                if session is None:
                    wait = self._next_connect_at - self._clock()
                    if wait > 0:
                        stop.wait(min(wait, 0.5))
                        continue
                    self._open_session()
                else:
                    self._service(session)
        finally:
            self._shutdown()

    # -- connection

    def _make_client(self) -> paho.Client:
        v5 = self.settings.protocol == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.vehicle_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            # with commands, the broker keeps the session (and queued requests) while offline
            clean_session=None if v5 else self._inbox is None,
            manual_ack=self._inbox is not None,
        )
        client.tls_set_context(self._tls)
        client.connect_timeout = self.settings.connect_timeout_s
        client.max_inflight_messages_set(self.settings.max_inflight + 1)
        client.will_set(
            self.topics.status, status_payload("offline", self.vehicle_id), qos=QOS, retain=True
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        client.on_message = self._on_message
        return client

    def _open_session(self) -> None:
        now = self._clock()
        session = _Session(deadline=now + self.settings.connect_timeout_s)
        self._session = session
        self._count("connect_attempts")
        s = self.settings
        try:
            if s.protocol == "5" and self._inbox is not None:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = s.session_expiry_s
                rc = self._client.connect(s.host, s.port, s.keepalive_s, clean_start=False,
                                          properties=properties)
            elif s.protocol == "5":
                rc = self._client.connect(s.host, s.port, s.keepalive_s, clean_start=True)
            else:
                rc = self._client.connect(s.host, s.port, s.keepalive_s)
        except (OSError, ValueError) as exc:
            self._end_session(session, classify_connect_error(exc, s.host, s.port))
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not session.closed:
            self._end_session(session, classify_lost_before_connack(session.socket_error))
        elif session.closed:
            self._end_session(session, session.end)

    def _service(self, session: _Session) -> None:
        rc = self._client.loop(timeout=POLL_S)
        if session.closed:
            self._end_session(session, session.end)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            end = (
                ConnectFailure("connection_lost", _lost_detail(session.socket_error))
                if session.established
                else classify_lost_before_connack(session.socket_error)
            )
            self._end_session(session, end)
            return
        now = self._clock()
        if not session.established:
            if now > session.deadline:
                self._end_session(
                    session, ConnectFailure("connack_timeout", "no CONNACK from the broker in time")
                )
            return
        if session.started_at and now - session.started_at >= STABLE_SESSION_S:
            self._failures = 0
        if any(now - f.sent_at > self.settings.puback_timeout_s for f in self._inflight.values()):
            self._end_session(
                session, ConnectFailure("puback_timeout", "broker did not acknowledge in time")
            )
            return
        self._send_acks()
        if now - session.status_sent_at >= self.settings.status_interval_s:
            self._publish_status(session, now)
        self._fill_window(session, now)

    def _end_session(self, session: _Session, end: ConnectFailure | None) -> None:
        """Record why ``session`` ended, drop the socket and schedule the next attempt."""
        if self._session is not session:
            return
        end = end or ConnectFailure("connection_lost", "connection lost")
        self._session = None
        now = self._clock()
        if session.established and now - session.started_at >= STABLE_SESSION_S:
            self._failures = 0
        self._failures += 1
        delay = backoff_delay(
            self._failures, self.settings.reconnect_min_s, self.settings.reconnect_max_s, self._rng
        )
        self._next_connect_at = now + delay
        if end.cause == "client_cert_rejected":
            end = ConnectFailure(
                end.cause, end.detail + _certificate_expiry_note(self._certificate, time.time())
            )
        self._last_failure = end
        kind = "disconnects" if session.established else "connect_failures"
        with self._lock:
            tally: dict[str, int] = getattr(self._counters, kind)
            tally[end.cause] = tally.get(end.cause, 0) + 1
        event = "mqtt disconnected" if session.established else "mqtt connect failed"
        log.warning(
            event,
            cause=end.cause,
            detail=end.detail,
            broker=f"{self.settings.host}:{self.settings.port}",
            retry_in_s=round(delay, 2),
            unacked_in_flight=len(self._inflight),
        )
        self._drop_connection(session)
        # Publishes still in flight are re-sent by paho after the next CONNACK; their
        # PUBACK clocks restart then.

    def _drop_connection(self, session: _Session) -> None:
        """Close the socket (a no-op if paho already did).

        When we abandon a live MQTT v5 connection ourselves, ask the broker to publish our
        Last Will so the retained status says offline.
        """
        session.closed = True
        if session.established and self.settings.protocol == "5":
            self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
        else:
            self._client.disconnect()

    # -- paho callbacks (all run inside client.loop()/connect() on our thread)

    def _on_log(self, client: paho.Client, userdata: Any, level: int, message: str) -> None:
        if level == paho.MQTT_LOG_ERR and self._session is not None:
            self._session.socket_error = message

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        session = self._session
        if session is None:
            return
        if reason_code.is_failure:
            session.closed = True
            session.end = ConnectFailure(
                "connack_refused",
                f"broker refused the connection: {reason_code} (0x{reason_code.value:02x})",
            )
            return
        now = self._clock()
        session.established = True
        session.started_at = now
        # One slot of the broker's Receive Maximum stays free for the status message.
        # (paho's own limit, max_inflight + 1, is fixed at creation and never binds first.)
        receive_max = getattr(properties, "ReceiveMaximum", None) or 65535
        self._window = max(1, min(self.settings.max_inflight, receive_max - 1))
        for entry in self._inflight.values():
            entry.sent_at = now
        self._count("connects")
        if self._inbox is not None:
            client.subscribe(self.topics.stream("cmd/req/+"), qos=QOS)
        self._publish_status(session, now)
        log.info(
            "mqtt connected",
            broker=f"{self.settings.host}:{self.settings.port}",
            protocol=self.settings.protocol,
            window=self._window,
            resending=len(self._inflight),
        )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._inbox is None:
            return
        mid, qos = message.mid, message.qos

        def ack() -> None:
            if qos > 0:
                self._acks.put(mid)

        try:
            self._inbox.deliver(message.topic, bytes(message.payload), ack)
        except Exception as exc:  # a failing inbox must not stop the uplink; redelivered later
            self._count("source_errors")
            log.error("command inbox failed", topic=message.topic, error=repr(exc))

    def _send_acks(self) -> None:
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return
            self._client.ack(mid, QOS)

    def _publish_status(self, session: _Session, now: float) -> None:
        fields: dict[str, object] = {}
        token: object = None
        if self._status is not None:
            try:
                fields, token = self._status.status_report()
            except Exception as exc:  # a failing report must not stop the uplink
                self._count("source_errors")
                log.error("status report failed", error=repr(exc))
        info = self._client.publish(
            self.topics.status, status_payload("online", self.vehicle_id, fields), qos=QOS, retain=True
        )
        session.status_mid = info.mid
        session.status_token = token
        session.status_sent_at = now

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        session = self._session
        if session is None or session.closed:
            return
        session.closed = True
        if session.end is not None:
            return
        if flags.is_disconnect_packet_from_server:
            session.end = ConnectFailure(
                "broker_disconnect", f"broker sent DISCONNECT: {reason_code}"
            )
        elif not session.established:
            session.end = classify_lost_before_connack(session.socket_error)
        else:
            session.end = ConnectFailure(
                "connection_lost", _lost_detail(session.socket_error, reason_code)
            )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        session = self._session
        if session is not None and mid == session.status_mid:
            if reason_code.is_failure:
                log.warning("broker refused status message", reason=str(reason_code))
            elif self._status is not None and session.status_token is not None:
                token, session.status_token = session.status_token, None
                self._status.status_delivered(token)
            return
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return
        if reason_code.is_failure:
            retry = self._retry.get(entry.seq)
            attempts = retry.attempts + 1 if retry else 1
            delay = backoff_delay(
                attempts,
                self.settings.denied_retry_min_s,
                self.settings.denied_retry_max_s,
                self._rng,
            )
            self._retry[entry.seq] = _Retry(attempts, self._clock() + delay)
            self._count("denied")
            log.warning(
                "broker refused publish; batch kept for retry",
                seq=entry.seq,
                topic=entry.topic,
                reason=str(reason_code),
                reason_code=f"0x{reason_code.value:02x}",
                attempts=attempts,
                retry_in_s=round(delay, 2),
            )
            return
        # Deleted from the outbox in one transaction per loop turn (_delete_acked): a crash
        # before that re-sends them, which the backend detects as duplicates.
        self._acked.append(entry.seq)
        self._retry.pop(entry.seq, None)
        self._count("acked")

    def _delete_acked(self) -> None:
        if not self._acked:
            return
        try:
            self._source.ack_many(self._acked)
        except Exception as exc:  # the outbox failing must not stop the uplink
            self._count("source_errors")
            log.error("outbox ack failed; batches will be sent again", seqs=len(self._acked), error=repr(exc))
        self._acked = []

    # -- publishing

    def _fill_window(self, session: _Session, now: float) -> None:
        self._delete_acked()
        free = self._window - len(self._inflight)
        if free <= 0:
            return
        blocked = {f.seq for f in self._inflight.values()} | self._unpublishable
        blocked |= {seq for seq, r in self._retry.items() if r.due > now}
        deferred: set[int] = set()
        # A few rounds so that a rate-limited stream does not starve the others.
        for _ in range(len(DATA_STREAMS) + 1):
            try:
                batches = self._source.pending(free, exclude=blocked | deferred)
            except Exception as exc:  # the outbox failing must not stop the uplink
                self._count("source_errors")
                log.error("outbox read failed", error=repr(exc))
                return
            if not batches:
                return
            for batch in batches:
                if free <= 0 or session.closed:
                    return
                if batch.stream not in DATA_STREAMS:
                    self._reject(batch, f"unknown stream {batch.stream!r}")
                    blocked.add(batch.seq)
                    continue
                if not self._bucket(batch.stream, now).try_take(now):
                    self._count("rate_limited")
                    deferred.add(batch.seq)
                    continue
                self._publish(batch, now)
                blocked.add(batch.seq)
                free -= 1

    def _publish(self, batch: StoredBatch, now: float) -> None:
        topic = self.topics.stream(batch.stream)
        try:
            info = self._client.publish(topic, bytes(batch.payload), qos=QOS)
        except ValueError as exc:  # e.g. payload larger than MQTT allows
            self._reject(batch, str(exc))
            return
        # QoS 1 messages are kept by paho even if the write failed; they go out after
        # the next CONNACK, so the batch counts as in flight either way.
        self._inflight[info.mid] = _InFlight(batch.seq, topic, now)
        self._count("published")

    def _reject(self, batch: StoredBatch, reason: str) -> None:
        self._unpublishable.add(batch.seq)
        self._count("unpublishable")
        log.error("batch cannot be published; left in the outbox", seq=batch.seq, reason=reason)

    def _bucket(self, stream: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(stream)
        if bucket is None:
            rate = self.settings.max_publishes_per_s
            bucket = self._buckets[stream] = TokenBucket(rate, max(1.0, rate), now)
        return bucket

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + 1)

    # -- shutdown

    def _shutdown(self) -> None:
        session = self._session
        if session is not None and session.established and not session.closed:
            info = self._client.publish(
                self.topics.status, status_payload("offline", self.vehicle_id), qos=QOS, retain=True
            )
            session.status_mid = info.mid
            deadline = time.monotonic() + OFFLINE_ACK_WAIT_S
            while (
                info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
                and not info.is_published()
                and not session.closed
                and time.monotonic() < deadline
            ):
                self._client.loop(timeout=POLL_S)
            self._client.disconnect()
        elif session is not None:
            self._client.disconnect()
        self._session = None
        self._delete_acked()
        log.info("mqtt publisher stopped", in_flight_unacked=len(self._inflight))
