"""``telematics-sim backend ... command``: sign a remote command, send it to one vehicle, follow its results.

The fleet side of remote commands in miniature::

    telematics-sim backend --pki fleet/ command --vehicle VIN --name lock_doors \\
        --signing-key fleet/command-signing.key --kid dev-1 [--param k=v ...]

It builds the command body (``agent.commands.envelope``), signs it with the fleet's
Ed25519 command key (``telematics-agent pki command-key``), connects with the backend's
TLS identity (mutual TLS, MQTT v5, QoS 1), subscribes to ``{prefix}/{vehicle}/cmd/res``
*before* publishing the request on ``{prefix}/{vehicle}/cmd/req/{id}`` (so no result can
slip past), then prints every result for that command id until a final state.

Exit status: 0 succeeded (with ``--no-wait``: the broker took the request); 1 another
final state (rejected, failed, timed_out, expired); 2 usage errors (bad options or
values the envelope cannot carry); 3 no final result within ``--timeout``; 69 the broker
was unreachable, refused us, or the connection was lost; 78 an unusable key or
certificate file; 128+N stopped by signal N.

Defaults worth knowing:

* The command id is a fresh UUID4 (it matches the envelope's id rule and is the last
  topic level). Re-sending with the same ``--id`` is reported by the vehicle as a replay
  (with the stored result of the first one, if it ran).
* The counter is the current wall time in milliseconds. Vehicles require it to grow
  strictly per issuer, so this holds as long as the sending host's clock does not jump
  back and two commands of one issuer are not sent in the same millisecond from different
  hosts; a backend with several senders per issuer must use a shared counter (``--counter``).
* ``iat`` is now and ``exp`` is now + ``--ttl`` (60 s): a vehicle that is offline longer
  reports the command as ``expired`` when it reconnects. Vehicles accept at most their
  ``max_lifetime_ms`` (1 h by default) and allow 30 s of clock skew.

A vehicle answers only commands whose signature it verified: a command it rejects before
that (unknown kid, bad signature, key outside its window, too large, malformed) gets no
result, and this tool then ends with status 3 after ``--timeout``.

The broker binds the client id to the certificate CN and keeps one connection per client
id, so this tool and a running ``telematics-sim backend`` monitor must not share an
identity: they knock each other off (the monitor reconnects, this tool exits 69), and this
tool's clean start discards the monitor's persistent session with the telemetry queued in
it. Give it an identity of its own that the broker ACL lists among the backend users
(``--name``/``--cert``/``--key``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.commands.envelope import DEFAULT_MAX_BYTES, MAX_COUNTER, NAME_RE, sign_command, sign_command_json
from agent.commands.keys import TOKEN_RE, load_signing_key
from agent.commands.results import FINAL_STATES, CommandResult, ResultRejected, decode_result
from agent.commands.schema import ParameterValue
from agent.errors import EX_CONFIG, ConfigError
from agent.pki import check_private_key_file, common_name, load_certificate
from agent.uplink.mqtt import (
    QOS,
    ConnectFailure,
    MqttSettings,
    build_tls_context,
    check_tls_context,
    classify_connect_error,
    classify_lost_before_connack,
)
from simulator.commands.common import EX_UNAVAILABLE, EX_USAGE, error, positive_float, stop_on_signals

EX_SUCCEEDED: Final = 0
EX_NOT_SUCCEEDED: Final = 1
EX_NO_RESULT: Final = 3
BROKER_WAIT_S: Final = 10.0  # CONNACK, SUBACK and PUBACK each
POLL_S: Final = 0.1
MAX_DETAIL_CHARS: Final = 1000

_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE: Final = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")


# --------------------------------------------------------------------------- options


def _matching(pattern: re.Pattern[str], rule: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
        return text
    return check


TOKEN_RULE: Final = "1-64 characters A-Z a-z 0-9 . _ : - starting with a letter or digit"
NAME_RULE: Final = "1-64 characters A-Z a-z 0-9 _ - not starting with a digit or -"


def parameter(text: str) -> tuple[str, ParameterValue]:
    """``k=v``: v as an int, a float, true/false, else text (the vehicle checks types)."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. speed_limit=90")
    if not NAME_RE.fullmatch(key):
        raise argparse.ArgumentTypeError(f"parameter name {key!r}: {NAME_RULE}")
    if raw in ("true", "false"):
        return key, raw == "true"
    if _INT_RE.fullmatch(raw):
        return key, int(raw)
    if _FLOAT_RE.fullmatch(raw):
        value = float(raw)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"parameter {key}: {raw} is not a finite number")
        return key, value
    return key, raw


def counter_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_COUNTER:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_COUNTER}, got {value}")
    return value


def add_subparser(backend: argparse.ArgumentParser) -> None:
    """Hook ``command`` under ``telematics-sim backend`` (whose broker and identity options it uses).

    Without an action, ``backend`` stays the monitor. Option dests here must not repeat the
    backend parser's: argparse copies a subparser's values (defaults too) over the parent's.
    """
    actions = backend.add_subparsers(dest="backend_action", metavar="ACTION",
                                     title="actions (default: monitor the fleet's uplink)")
    p = actions.add_parser(
        "command", help="sign a remote command, send it to a vehicle and follow its results",
        description="Sign a command with a command-signing key (telematics-agent pki command-key), "
                    "publish it on PREFIX/VEHICLE/cmd/req/ID with the backend identity (broker and "
                    "identity options go before 'command') and print each result from "
                    "PREFIX/VEHICLE/cmd/res until a final one. Exit status: 0 succeeded, 1 rejected/"
                    "failed/timed_out/expired, 2 usage, 3 no final result in time, 69 broker "
                    "unreachable or refused, 78 unusable key or certificate.")
    what = p.add_argument_group("the command")
    what.add_argument("--vehicle", required=True, type=_matching(TOKEN_RE, TOKEN_RULE), metavar="VIN",
                      help="vehicle id (its certificate CN)")
    what.add_argument("--name", dest="command_name", required=True, type=_matching(NAME_RE, NAME_RULE),
                      metavar="COMMAND", help="command name from the vehicle profile, e.g. lock_doors")
    what.add_argument("--param", dest="command_params", action="append", type=parameter, default=[],
                      metavar="NAME=VALUE", help="a parameter (repeatable); VALUE is read as an int, a float, "
                                                 "true/false, else text")
    what.add_argument("--ttl", type=positive_float, default=60.0, metavar="S",
                      help="the command expires S seconds after it is issued (default 60)")
    what.add_argument("--id", dest="command_id", type=_matching(TOKEN_RE, TOKEN_RULE), metavar="ID",
                      help="command id (default: a fresh UUID4)")
    what.add_argument("--counter", type=counter_value, metavar="N",
                      help="issuer counter, strictly increasing per issuer (default: now in ms)")
    sig = p.add_argument_group("signing")
    sig.add_argument("--signing-key", required=True, type=Path, metavar="KEY",
                     help="Ed25519 command-signing key (PEM, mode 0600)")
    sig.add_argument("--kid", required=True, type=_matching(TOKEN_RE, TOKEN_RULE),
                     help="its key id in the vehicles' trusted command keys")
    sig.add_argument("--json", dest="json_envelope", action="store_true",
                     help="send the JSON form of the envelope instead of CBOR")
    wait = p.add_argument_group("waiting")
    wait.add_argument("--timeout", type=positive_float, default=30.0, metavar="S",
                      help="wait at most S seconds for a final result after the broker took the request "
                           "(default 30)")
    wait.add_argument("--no-wait", action="store_true",
                      help="exit once the broker acknowledged the request; do not follow results")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- following results


@dataclass
class ResultFollower:
    """Picks this command's results out of the vehicle's result stream. Pure, no I/O."""

    vehicle_id: str
    command_id: str
    seen: set[tuple[str, int]] = field(default_factory=set)
    results: list[CommandResult] = field(default_factory=list)
    ignored: int = 0

    def feed(self, payload: bytes) -> CommandResult | str | None:
        """A new result of this command, a problem to report (text), or None (not ours, or seen)."""
        try:
            decoded = decode_result(payload)
        except ResultRejected as exc:
            return f"ignored a result payload ({len(payload)} B): {exc.reason}: {exc.detail[:200]}"
        if decoded.vehicle_id != self.vehicle_id:
            return f"ignored a result claiming vehicle {decoded.vehicle_id!r} on {self.vehicle_id}'s topic"
        if decoded.result.command_id != self.command_id:
            self.ignored += 1
            return None
        key = (decoded.boot_id, decoded.seq)
        if key in self.seen:  # delivery is at least once
            return None
        self.seen.add(key)
        self.results.append(decoded.result)
        return decoded.result

    @property
    def final(self) -> CommandResult | None:
        return next((r for r in self.results if r.state in FINAL_STATES), None)


def _text(value: str) -> str:
    return value if value.isprintable() else json.dumps(value)


def result_line(vehicle_id: str, result: CommandResult) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(result.ts_ms / 1000)) + f".{result.ts_ms % 1000:03d}"
    line = f"{at} {vehicle_id} {result.command_id} {result.state}"
    if result.reason is not None:
        line += f" reason={_text(result.reason)}"
    if result.detail:
        detail = json.dumps(result.detail, sort_keys=True, separators=(",", ":"), default=repr)
        line += " detail=" + (detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS] + "...")
    return line


# --------------------------------------------------------------------------- MQTT adapter


class SendFailure(Exception):
    """The broker did not take part: unreachable, refused, or the connection ended."""

    def __init__(self, failure: ConnectFailure) -> None:
        super().__init__(f"{failure.cause}: {failure.detail}")
        self.failure = failure


class Interrupted(Exception):
    """A signal asked us to stop."""


@dataclass
class _State:
    connected: bool = False
    closed: bool = False
    end: ConnectFailure | None = None
    socket_error: str | None = None
    subscribe_mid: int | None = None
    suback: list[ReasonCode] | None = None
    publish_mid: int | None = None
    puback: ReasonCode | None = None
    messages: list[tuple[str, bytes]] = field(default_factory=list)


class CommandSession:
    """One short MQTT v5 session with a backend identity, driven from the caller's thread.

    Clean start, no session expiry: nothing stays on the broker after we leave.
    Raises :class:`ConfigError` for unusable identity files (missing, unsafe key mode, no CN).
    """

    def __init__(self, *, host: str, port: int, ca_file: Path | str, cert_file: Path | str,
                 key_file: Path | str, stop: threading.Event, topic_prefix: str = "vt",
                 keepalive_s: int = 30) -> None:
        try:
            self.settings = MqttSettings.model_validate({
                "host": host, "port": port, "ca_file": Path(ca_file), "cert_file": Path(cert_file),
                "key_file": Path(key_file), "topic_prefix": topic_prefix, "keepalive_s": keepalive_s,
                "connect_timeout_s": BROKER_WAIT_S})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError.single("<backend options>", str(exc)) from None
        check_private_key_file(self.settings.key_file)
        cn = common_name(load_certificate(self.settings.cert_file).subject)
        if not cn:
            raise ConfigError.single(str(cert_file), "certificate has no common name (CN); the broker "
                                                     "identifies clients by it")
        self.client_id = cn
        tls: ssl.SSLContext = build_tls_context(self.settings)
        check_tls_context(tls)
        self._stop = stop
        self._state = _State()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cn,
                                  protocol=paho.MQTTv5)
        self.client.tls_set_context(tls)
        self.client.connect_timeout = BROKER_WAIT_S
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_log = self._on_log

    @property
    def broker(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def open(self) -> None:
        s = self.settings
        try:
            rc = self.client.connect(s.host, s.port, s.keepalive_s, clean_start=True)
        except (OSError, ValueError) as exc:
            raise SendFailure(classify_connect_error(exc, s.host, s.port)) from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SendFailure(classify_lost_before_connack(self._state.socket_error))
        self._until(lambda: self._state.connected, BROKER_WAIT_S, "CONNACK")

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, options=SubscribeOptions(qos=QOS))
        self._state.subscribe_mid = mid
        self._until(lambda: self._state.suback is not None, BROKER_WAIT_S, "SUBACK")
        codes = self._state.suback or []
        if not codes or any(rc.is_failure for rc in codes):
            shown = ", ".join(f"{rc} (0x{rc.value:02x})" for rc in codes) or "no reason code"
            raise SendFailure(ConnectFailure(
                "subscribe_refused", f"broker refused the subscription to {topic}: {shown}; does the ACL let "
                                     f"{self.client_id} read it?"))

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=QOS)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SendFailure(ConnectFailure("publish_failed", f"cannot publish: {paho.error_string(info.rc)}"))
        self._state.publish_mid = info.mid
        self._until(lambda: self._state.puback is not None, BROKER_WAIT_S, "PUBACK")
        rc = self._state.puback
        if rc is not None and rc.is_failure:
            raise SendFailure(ConnectFailure(
                "publish_refused", f"broker refused the request: {rc} (0x{rc.value:02x}); does the ACL let "
                                   f"{self.client_id} write {topic}?"))

    def take_messages(self) -> list[tuple[str, bytes]]:
        messages, self._state.messages = self._state.messages, []
        return messages

    def poll(self) -> None:
        """Serve the connection for up to POLL_S; SendFailure when it ended, Interrupted on a signal."""
        if self._stop.is_set():
            raise Interrupted
        rc = self.client.loop(timeout=POLL_S)
        state = self._state
        if state.closed or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            if state.end is not None:
                raise SendFailure(state.end)
            if state.connected:
                raise SendFailure(ConnectFailure("connection_lost", state.socket_error or str(rc)))
            raise SendFailure(classify_lost_before_connack(state.socket_error))

    def close(self) -> None:
        if self._state.connected and not self._state.closed:
            self.client.disconnect()
            self.client.loop(timeout=POLL_S)  # let the DISCONNECT go out

    def _until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise SendFailure(ConnectFailure(f"{what.lower()}_timeout",
                                                 f"no {what} from the broker at {self.broker} in {timeout:g} s"))
            self.poll()

    # paho callbacks (run inside loop() on the caller's thread)

    def _on_log(self, client: paho.Client, userdata: Any, level: int, message: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._state.socket_error = message

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._state.closed = True
            self._state.end = ConnectFailure(
                "connack_refused", f"broker refused the connection: {reason_code} (0x{reason_code.value:02x})")
            return
        self._state.connected = True

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        state = self._state
        state.closed = True
        if state.end is not None:
            return
        # mosquitto drops the older of two connections with one client id (= the certificate CN)
        # without a reason code, so the likely cause is named for any loss after CONNACK.
        hint = (f"; if another client uses the identity {self.client_id} (a running `telematics-sim backend` "
                "monitor?), the broker drops one of them: give this tool its own backend identity")
        if flags.is_disconnect_packet_from_server:
            state.end = ConnectFailure("broker_disconnect", f"broker sent DISCONNECT: {reason_code}{hint}")
        elif state.connected:
            state.end = ConnectFailure("connection_lost",
                                       (state.socket_error or f"connection lost ({reason_code})") + hint)
        else:
            state.end = classify_lost_before_connack(state.socket_error)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        if mid == self._state.subscribe_mid:
            self._state.suback = list(reason_codes)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if mid == self._state.publish_mid:
            self._state.puback = reason_code

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._state.messages.append((message.topic, bytes(message.payload)))


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class SignedRequest:
    command_id: str
    counter: int
    issued_at_ms: int
    expires_at_ms: int
    payload: bytes


def sign_request(args: argparse.Namespace, params: dict[str, ParameterValue], now_ms: int) -> SignedRequest:
    """The signed request; ConfigError for an unusable key, ValueError for values the envelope cannot carry."""
    private_key = load_signing_key(args.signing_key)
    command_id: str = args.command_id or str(uuid.uuid4())
    counter: int = args.counter if args.counter is not None else now_ms
    expires = now_ms + max(1, round(args.ttl * 1000))
    fields: dict[str, Any] = {
        "command_id": command_id, "vehicle_id": args.vehicle, "name": args.command_name, "params": params,
        "issued_at_ms": now_ms, "expires_at_ms": expires, "counter": counter, "private_key": private_key,
        "kid": args.kid}
    payload = sign_command_json(**fields).encode("utf-8") if args.json_envelope else sign_command(**fields)
    return SignedRequest(command_id, counter, now_ms, expires, payload)


def _clock_ms(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def run(args: argparse.Namespace) -> int:
    # Imported here: simulator.commands.backend imports this module to hook the subcommand in.
    from simulator.commands.backend import identity_files

    files = identity_files(args)
    if isinstance(files, str):
        args._parser.print_usage(sys.stderr)
        error(files)
        return EX_USAGE
    params: dict[str, ParameterValue] = {}
    for key, value in args.command_params:
        if key in params:
            error(f"parameter {key} given twice")
            return EX_USAGE
        params[key] = value
    try:
        request = sign_request(args, params, time.time_ns() // 1_000_000)
    except ConfigError as exc:
        error(f"cannot use the signing key\n{exc}")
        return EX_CONFIG
    except ValueError as exc:
        error(f"cannot build the command: {exc}")
        return EX_USAGE
    if len(request.payload) > DEFAULT_MAX_BYTES:
        error(f"the command is {len(request.payload)} bytes; vehicles reject commands over their max_bytes "
              f"(default {DEFAULT_MAX_BYTES}) without answering")
    ca, cert, key = files
    stop = threading.Event()
    try:
        session = CommandSession(host=args.host, port=args.port, ca_file=ca, cert_file=cert, key_file=key,
                                 topic_prefix=args.prefix, stop=stop)
    except ConfigError as exc:
        error(f"cannot use the backend identity\n{exc}")
        return EX_CONFIG
    with stop_on_signals(stop.set) as received:
        try:
            return _send_and_follow(args, session, request)
        except SendFailure as exc:
            error(f"broker {session.broker}: {exc}")
            return EX_UNAVAILABLE
        except Interrupted:
            error(f"interrupted; command {request.command_id} may still run (its results go to "
                  f"{args.prefix}/{args.vehicle}/cmd/res)")
            return 128 + (received[0] if received else 2)
        finally:
            session.close()


def _send_and_follow(args: argparse.Namespace, session: CommandSession, request: SignedRequest) -> int:
    vehicle = args.vehicle
    request_topic = f"{args.prefix}/{vehicle}/cmd/req/{request.command_id}"
    result_topic = f"{args.prefix}/{vehicle}/cmd/res"
    session.open()
    if not args.no_wait:
        session.subscribe(result_topic)  # before publishing: no result can arrive unseen
    session.publish(request_topic, request.payload)
    form = "JSON" if args.json_envelope else "CBOR"
    print(f"sent {args.command_name} to {vehicle}: id {request.command_id}, counter {request.counter}, "
          f"valid until {_clock_ms(request.expires_at_ms)} ({len(request.payload)} B {form} on {request_topic})",
          flush=True)
    if args.no_wait:
        return EX_SUCCEEDED
    follower = ResultFollower(vehicle, request.command_id)
    deadline = time.monotonic() + args.timeout
    while True:
        for topic, payload in session.take_messages():
            if topic != result_topic:
                continue
            update = follower.feed(payload)
            if isinstance(update, str):
                print(f"telematics-sim: warning: {update}", file=sys.stderr, flush=True)
            elif update is not None:
                print(result_line(vehicle, update), flush=True)
        final = follower.final
        if final is not None:
            return EX_SUCCEEDED if final.state == "succeeded" else EX_NOT_SUCCEEDED
        if time.monotonic() >= deadline:
            last = follower.results[-1].state if follower.results else "none"
            error(f"no final result for {request.command_id} within {args.timeout:g} s (last state: {last}). "
                  "An offline vehicle gets the request when it reconnects; a vehicle answers nothing for a "
                  "command it cannot authenticate (unknown kid, bad signature, key outside its validity, "
                  "too large or malformed)")
            return EX_NO_RESULT
        session.poll()
