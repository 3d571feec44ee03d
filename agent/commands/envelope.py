"""Signed command envelopes and the trust decision over them. Pure logic, no I/O.

A remote command reaches the vehicle as one MQTT payload. :class:`CommandVerifier`
decides whether to trust it and returns a :class:`VerifiedCommand`, or raises
:class:`CommandRejected` with a stable reason code; a rejected command is never
executed. Replay state is read through a :class:`ReplayView` (the durable one is
``agent.commands.replay.ReplayStore.view()``); recording an accepted command is the
caller's next step (``ReplayStore.accept``), which re-checks atomically.

Envelope, version 1 (CBOR, the profile of docs/protocol.md §1: definite lengths, no
tags, no duplicate keys, nothing after the top-level item)::

    {"v": 1, "kid": tstr, "body": bstr, "sig": bstr (64 bytes)}

``body`` is a CBOR map (written in canonical form by :func:`sign_command`) with exactly::

    "id":      tstr  command id, 1-64 chars A-Z a-z 0-9 . _ : - starting alphanumeric
    "vehicle": tstr  the vehicle id it is for (same character rules)
    "name":    tstr  command name, 1-64 chars A-Z a-z 0-9 _ - not starting with a digit or -
    "params":  map   parameter name (same rule as name) -> int | float | bool | tstr;
                     at most 32; ints within +-(2**63-1), floats finite, text <= 256 chars
    "iat":     uint  issued at, milliseconds since the Unix epoch (UTC)
    "exp":     uint  expires at, same unit; iat < exp <= iat + max_lifetime
    "ctr":     uint  the issuer's counter, 1 .. 2**63-1, strictly increasing per issuer

``sig`` is an Ed25519 signature over ``SIGNING_DOMAIN || kid (ASCII) || 0x00 || body``: the
domain prefix keeps a command signature from being valid for anything else, binding the
kid keeps an envelope from being re-labelled. The issuer is not in the envelope: it is
the trusted key's issuer (``agent.commands.keys``), so one issuer's key cannot consume
another issuer's counter. The body is decoded only after the signature has been checked,
and exactly the signed bytes are decoded.

JSON form, for tooling (recognised by its first non-blank byte ``{``, which no CBOR
envelope starts with): ``{"v": 1, "kid": "...", "body": "<base64>", "sig": "<base64>"}``,
standard base64 with padding; the body stays CBOR, so both forms carry the same signed
bytes. Strict JSON: no duplicate keys, no NaN/Infinity.

Check order (the first failing check names the reason): size; decoding; version;
envelope shape; signature present; key id known; key within its validity window;
signature; body shape; vehicle; replayed id; replayed counter; issued before a replay
state reset; lifetime; expired / not yet valid (with ``max_skew_ms``); command known;
parameters. A redelivered command therefore reports ``replayed_id`` even after it has
expired, so its stored result can be sent again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from agent.commands.keys import TOKEN_RE, Keyring
from agent.commands.schema import ParameterProblem, ParameterSpecLike, ParameterValue, check_parameters
from agent.errors import RejectedInput
from agent.wire import BatchRejected, strict_cbor

ENVELOPE_VERSION: Final = 1
SIGNING_DOMAIN: Final = b"vehicle-telematics-agent/command/v1\x00"

# Stable reason codes (what the cloud and the audit log see).
TOO_LARGE: Final = "too_large"
MALFORMED: Final = "malformed"
UNSUPPORTED_VERSION: Final = "unsupported_version"
BAD_SIGNATURE: Final = "bad_signature"
UNKNOWN_KEY: Final = "unknown_key"
KEY_NOT_VALID: Final = "key_not_valid"
WRONG_VEHICLE: Final = "wrong_vehicle"
REPLAYED_ID: Final = "replayed_id"
REPLAYED_COUNTER: Final = "replayed_counter"
REPLAY_STATE_RESET: Final = "replay_state_reset"
LIFETIME_TOO_LONG: Final = "lifetime_too_long"
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not_yet_valid"
UNKNOWN_COMMAND: Final = "unknown_command"
BAD_PARAMETERS: Final = "bad_parameters"
REASONS: Final = (TOO_LARGE, MALFORMED, UNSUPPORTED_VERSION, BAD_SIGNATURE, UNKNOWN_KEY, KEY_NOT_VALID,
                  WRONG_VEHICLE, REPLAYED_ID, REPLAYED_COUNTER, REPLAY_STATE_RESET, LIFETIME_TOO_LONG,
                  EXPIRED, NOT_YET_VALID, UNKNOWN_COMMAND, BAD_PARAMETERS)

DEFAULT_MAX_BYTES: Final = 4096
DEFAULT_MAX_SKEW_MS: Final = 30_000
DEFAULT_MAX_LIFETIME_MS: Final = 3_600_000

SIGNATURE_BYTES: Final = 64
NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")  # the profile's identifier rule
MAX_PARAMS: Final = 32
MAX_TEXT_PARAM_CHARS: Final = 256
MAX_PARAM_INT: Final = (1 << 63) - 1
MAX_TIME_MS: Final = 1 << 53
MAX_COUNTER: Final = (1 << 63) - 1
_ENVELOPE_KEYS: Final = frozenset({"v", "kid", "body", "sig"})
_BODY_KEYS: Final = frozenset({"id", "vehicle", "name", "params", "iat", "exp", "ctr"})
_JSON_BLANK: Final = b" \t\r\n"


class CommandRejected(RejectedInput):
    """A command that must not run. ``reason`` is one of :data:`REASONS`.

    ``command_id``, ``issuer`` and ``name`` are set only when the signature was verified
    (so they can be reported back and audited); for anything earlier they are None.
    """

    def __init__(self, reason: str, detail: str = "", *, command_id: str | None = None,
                 issuer: str | None = None, name: str | None = None) -> None:
        super().__init__(reason, detail)
        self.command_id = command_id
        self.issuer = issuer
        self.name = name


@dataclass(frozen=True, slots=True)
class VerifiedCommand:
    """A command that passed every check; ``params`` has defaults filled in."""

    command_id: str
    vehicle_id: str
    issuer: str
    kid: str
    name: str
    params: dict[str, ParameterValue]
    issued_at_ms: int
    expires_at_ms: int
    counter: int
    digest: str = field(repr=False)  # SHA-256 of the signed body, hex


class ReplayView(Protocol):
    """What the verifier needs to know about commands accepted before."""

    def seen(self, command_id: str) -> bool: ...

    def counter_for(self, issuer: str) -> int | None:
        """The highest counter accepted from ``issuer``, None if none yet."""
        ...

    def reset_at_ms(self) -> int | None:
        """When replay state was rebuilt after being lost (None: never lost)."""
        ...


@dataclass(frozen=True)
class StaticReplayView:
    """A fixed replay state, for tests and offline tools."""

    counters: Mapping[str, int] = field(default_factory=dict)
    seen_ids: frozenset[str] = frozenset()
    reset_ms: int | None = None

    def seen(self, command_id: str) -> bool:
        return command_id in self.seen_ids

    def counter_for(self, issuer: str) -> int | None:
        return self.counters.get(issuer)

    def reset_at_ms(self) -> int | None:
        return self.reset_ms


class VerifierSettings(BaseModel):
    """Limits of the trust decision (part of the agent config's commands section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=512, le=65_536,
                           description="largest command payload; checked before anything is parsed")
    max_skew_ms: int = Field(default=DEFAULT_MAX_SKEW_MS, ge=0, le=3_600_000,
                             description="clock difference allowed against iat/exp and key windows")
    max_lifetime_ms: int = Field(default=DEFAULT_MAX_LIFETIME_MS, gt=0, le=7 * 86_400_000,
                                 description="longest exp - iat accepted")


# --------------------------------------------------------------------------- decoding


def _reject(reason: str, detail: str) -> NoReturn:
    raise CommandRejected(reason, detail)


def _show(value: object) -> str:
    """A short, safe rendering of untrusted data for a detail message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _strict_cbor(data: bytes, what: str) -> Any:
    """The protocol's strict CBOR profile (agent.wire): no tags, definite lengths, depth <= 8."""
    try:
        return strict_cbor(data, what)
    except BatchRejected as exc:
        _reject(MALFORMED, exc.detail[:120])


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            _reject(MALFORMED, f"JSON: duplicate key {_show(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> NoReturn:
    _reject(MALFORMED, f"JSON: {name} is not allowed")


def _strict_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except CommandRejected:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        _reject(MALFORMED, f"JSON: {str(exc)[:80]}")


def _b64(value: object, reason: str, what: str) -> bytes:
    if type(value) is not str:
        _reject(reason, f"{what} must be base64 text in the JSON form")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _reject(reason, f"{what} is not valid base64")


@dataclass(frozen=True, slots=True)
class _Envelope:
    kid: str
    body: bytes
    sig: bytes


def _envelope(payload: bytes) -> _Envelope:
    is_json = payload.lstrip(_JSON_BLANK)[:1] == b"{"
    outer = _strict_json(payload) if is_json else _strict_cbor(payload, "envelope")
    if type(outer) is not dict:
        _reject(MALFORMED, f"envelope must be a map, got {type(outer).__name__}")
    version = outer.get("v")
    if type(version) is not int:
        _reject(MALFORMED, "envelope has no integer version 'v'")
    if version != ENVELOPE_VERSION:
        _reject(UNSUPPORTED_VERSION, f"envelope version {_show(version)}, this agent knows {ENVELOPE_VERSION}")
    unknown = set(outer) - _ENVELOPE_KEYS
    if unknown:
        _reject(MALFORMED, f"unknown envelope keys {sorted(_show(k) for k in unknown)[:5]}")
    if "body" not in outer:
        _reject(MALFORMED, "envelope has no body")
    body = _b64(outer["body"], MALFORMED, "body") if is_json else outer["body"]
    if type(body) is not bytes or not body:
        _reject(MALFORMED, "body must be a non-empty byte string")
    if "sig" not in outer:
        _reject(BAD_SIGNATURE, "the command is not signed")
    sig = _b64(outer["sig"], BAD_SIGNATURE, "sig") if is_json else outer["sig"]
    if type(sig) is not bytes or len(sig) != SIGNATURE_BYTES:
        _reject(BAD_SIGNATURE, f"sig must be {SIGNATURE_BYTES} bytes")
    kid = outer.get("kid")
    if kid is None:
        _reject(UNKNOWN_KEY, "the envelope names no key id")
    if type(kid) is not str or not TOKEN_RE.fullmatch(kid):
        _reject(MALFORMED, f"kid {_show(kid)} is not a valid key id")
    return _Envelope(kid, body, sig)


def signed_message(kid: str, body: bytes) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return SIGNING_DOMAIN + kid.encode("ascii") + b"\x00" + body


@dataclass(frozen=True, slots=True)
class _Body:
    command_id: str
    vehicle_id: str
    name: str
    params: dict[str, ParameterValue]
    issued_at_ms: int
    expires_at_ms: int
    counter: int


def _token(value: object, what: str, pattern: re.Pattern[str]) -> str:
    if type(value) is not str or not pattern.fullmatch(value):
        _reject(MALFORMED, f"{what} {_show(value)} is not valid (pattern {pattern.pattern})")
    return value


def _uint(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        _reject(MALFORMED, f"{what} must be an integer in {lo}..{hi}, got {_show(value)}")
    return value


def _param_value(name: str, value: object) -> ParameterValue:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -MAX_PARAM_INT <= value <= MAX_PARAM_INT:
            _reject(MALFORMED, f"parameter {name}: integer out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            _reject(MALFORMED, f"parameter {name}: numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT_PARAM_CHARS:
            _reject(MALFORMED, f"parameter {name}: text longer than {MAX_TEXT_PARAM_CHARS} characters")
        return value
    _reject(MALFORMED, f"parameter {name}: {type(value).__name__} is not an int, float, bool or text")


def _body(data: bytes) -> _Body:
    body = _strict_cbor(data, "body")
    if type(body) is not dict:
        _reject(MALFORMED, f"body must be a map, got {type(body).__name__}")
    keys = set(body)
    if keys != _BODY_KEYS:
        missing = sorted(_BODY_KEYS - keys)
        unknown = sorted(_show(k) for k in keys - _BODY_KEYS)[:5]
        _reject(MALFORMED, f"body keys wrong (missing {missing}, unknown {unknown})")
    params = body["params"]
    if type(params) is not dict:
        _reject(MALFORMED, f"params must be a map, got {type(params).__name__}")
    if len(params) > MAX_PARAMS:
        _reject(MALFORMED, f"more than {MAX_PARAMS} parameters")
    checked: dict[str, ParameterValue] = {}
    for key, value in params.items():
        name = _token(key, "parameter name", NAME_RE)
        checked[name] = _param_value(name, value)
    return _Body(
        command_id=_token(body["id"], "command id", TOKEN_RE),
        vehicle_id=_token(body["vehicle"], "vehicle id", TOKEN_RE),
        name=_token(body["name"], "command name", NAME_RE),
        params=checked,
        issued_at_ms=_uint(body["iat"], "iat", 0, MAX_TIME_MS),
        expires_at_ms=_uint(body["exp"], "exp", 0, MAX_TIME_MS),
        counter=_uint(body["ctr"], "ctr", 1, MAX_COUNTER),
    )


# --------------------------------------------------------------------------- the decision


class CommandVerifier:
    """Decides whether a command payload may run. No I/O: time comes from ``clock_ms``.

    ``schemas`` maps each command name the vehicle knows to its parameter specs (the
    profile's ``commands:``). One verifier may be shared by threads.
    """

    def __init__(self, vehicle_id: str, keyring: Keyring,
                 schemas: Mapping[str, Mapping[str, ParameterSpecLike]], *, clock_ms: Callable[[], int],
                 max_skew_ms: int = DEFAULT_MAX_SKEW_MS, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_lifetime_ms: int = DEFAULT_MAX_LIFETIME_MS) -> None:
        if not TOKEN_RE.fullmatch(vehicle_id):
            raise ValueError(f"invalid vehicle id {vehicle_id!r}")
        bad = [name for name in schemas if not NAME_RE.fullmatch(name)]
        if bad:
            raise ValueError(f"command names not sendable on the wire: {bad}")
        if max_skew_ms < 0 or max_bytes <= 0 or max_lifetime_ms <= 0:
            raise ValueError("max_skew_ms must be >= 0, max_bytes and max_lifetime_ms > 0")
        self.vehicle_id = vehicle_id
        self.keyring = keyring
        self.schemas = schemas
        self.clock_ms = clock_ms
        self.max_skew_ms = max_skew_ms
        self.max_bytes = max_bytes
        self.max_lifetime_ms = max_lifetime_ms

    @classmethod
    def from_settings(cls, vehicle_id: str, keyring: Keyring,
                      schemas: Mapping[str, Mapping[str, ParameterSpecLike]], settings: VerifierSettings, *,
                      clock_ms: Callable[[], int]) -> CommandVerifier:
        return cls(vehicle_id, keyring, schemas, clock_ms=clock_ms, max_skew_ms=settings.max_skew_ms,
                   max_bytes=settings.max_bytes, max_lifetime_ms=settings.max_lifetime_ms)

    def verify(self, payload: bytes, replay: ReplayView) -> VerifiedCommand:
        """Return the command if every check passes; otherwise raise :class:`CommandRejected`."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            _reject(MALFORMED, f"payload must be bytes, got {type(payload).__name__}")
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size > self.max_bytes:
            _reject(TOO_LARGE, f"{size} bytes, limit {self.max_bytes}")
        envelope = _envelope(bytes(payload))
        key = self.keyring.get(envelope.kid)
        if key is None:
            _reject(UNKNOWN_KEY, f"no trusted key with kid {envelope.kid}")
        now = self.clock_ms()
        problem = key.window_problem(now, self.max_skew_ms)
        if problem is not None:
            _reject(KEY_NOT_VALID, problem)
        try:
            key.public_key.verify(envelope.sig, signed_message(envelope.kid, envelope.body))
        except InvalidSignature:
            _reject(BAD_SIGNATURE, f"signature does not verify with key {envelope.kid}")
        body = _body(envelope.body)
        issuer = key.issuer

        def reject(reason: str, detail: str) -> NoReturn:
            raise CommandRejected(reason, detail, command_id=body.command_id, issuer=issuer, name=body.name)

        if body.vehicle_id != self.vehicle_id:
            reject(WRONG_VEHICLE, f"command is for vehicle {body.vehicle_id}")
        if replay.seen(body.command_id):
            reject(REPLAYED_ID, f"command {body.command_id} was accepted before")
        last = replay.counter_for(issuer)
        if last is not None and body.counter <= last:
            reject(REPLAYED_COUNTER, f"counter {body.counter} is not above {last}, the last accepted from {issuer}")
        reset = replay.reset_at_ms()
        if reset is not None and body.issued_at_ms < reset:
            reject(REPLAY_STATE_RESET, f"issued at {body.issued_at_ms} ms, before replay state was rebuilt "
                   f"at {reset} ms; re-issue the command")
        lifetime = body.expires_at_ms - body.issued_at_ms
        if lifetime <= 0:
            reject(MALFORMED, "exp must be later than iat")
        if lifetime > self.max_lifetime_ms:
            reject(LIFETIME_TOO_LONG, f"valid for {lifetime} ms, limit {self.max_lifetime_ms} ms")
        if now - self.max_skew_ms > body.expires_at_ms:
            reject(EXPIRED, f"expired at {body.expires_at_ms} ms, now {now} ms")
        if now + self.max_skew_ms < body.issued_at_ms:
            reject(NOT_YET_VALID, f"issued at {body.issued_at_ms} ms, now {now} ms")
        specs = self.schemas.get(body.name)
        if specs is None:
            reject(UNKNOWN_COMMAND, f"this vehicle has no command {body.name}")
        try:
            params = check_parameters(specs, body.params)
        except ParameterProblem as exc:
            reject(BAD_PARAMETERS, str(exc))
        return VerifiedCommand(
            command_id=body.command_id, vehicle_id=body.vehicle_id, issuer=issuer, kid=envelope.kid,
            name=body.name, params=params, issued_at_ms=body.issued_at_ms, expires_at_ms=body.expires_at_ms,
            counter=body.counter, digest=hashlib.sha256(envelope.body).hexdigest())


# --------------------------------------------------------------------------- signing


def encode_body(*, command_id: str, vehicle_id: str, name: str, params: Mapping[str, ParameterValue],
                issued_at_ms: int, expires_at_ms: int, counter: int) -> bytes:
    """The canonical CBOR body; ValueError when a field breaks the envelope rules."""
    fields = {"id": command_id, "vehicle": vehicle_id, "name": name, "params": dict(params),
              "iat": issued_at_ms, "exp": expires_at_ms, "ctr": counter}
    try:
        body = cbor2.dumps(fields, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode command fields: {exc}") from None
    try:
        _body(body)
    except CommandRejected as exc:
        raise ValueError(exc.detail) from None
    if expires_at_ms <= issued_at_ms:
        raise ValueError("expires_at_ms must be later than issued_at_ms")
    return body


def _signed_parts(private_key: Ed25519PrivateKey, kid: str, fields: dict[str, Any]) -> tuple[bytes, bytes]:
    if not TOKEN_RE.fullmatch(kid):
        raise ValueError(f"invalid kid {kid!r}")
    body = encode_body(**fields)
    return body, private_key.sign(signed_message(kid, body))


def sign_command(*, command_id: str, vehicle_id: str, name: str, params: Mapping[str, ParameterValue],
                 issued_at_ms: int, expires_at_ms: int, counter: int, private_key: Ed25519PrivateKey,
                 kid: str) -> bytes:
    """A signed command envelope in CBOR (what the backend publishes)."""
    body, sig = _signed_parts(private_key, kid, {
        "command_id": command_id, "vehicle_id": vehicle_id, "name": name, "params": params,
        "issued_at_ms": issued_at_ms, "expires_at_ms": expires_at_ms, "counter": counter})
    return cbor2.dumps({"v": ENVELOPE_VERSION, "kid": kid, "body": body, "sig": sig}, canonical=True)


def sign_command_json(*, command_id: str, vehicle_id: str, name: str, params: Mapping[str, ParameterValue],
                      issued_at_ms: int, expires_at_ms: int, counter: int, private_key: Ed25519PrivateKey,
                      kid: str) -> str:
    """The same signed envelope in its JSON form (body and sig in base64)."""
    body, sig = _signed_parts(private_key, kid, {
        "command_id": command_id, "vehicle_id": vehicle_id, "name": name, "params": params,
        "issued_at_ms": issued_at_ms, "expires_at_ms": expires_at_ms, "counter": counter})
    return json.dumps({"v": ENVELOPE_VERSION, "kid": kid, "body": base64.b64encode(body).decode("ascii"),
                       "sig": base64.b64encode(sig).decode("ascii")})
