"""Envelope parser under hostile input: property tests and a 100,000-payload mutation fuzz run.

Whatever arrives, ``verify`` returns a command that was really signed, or raises
CommandRejected with a known reason: never another exception, never a forgery.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections import Counter
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands.envelope import (
    REASONS,
    CommandRejected,
    CommandVerifier,
    StaticReplayView,
    VerifiedCommand,
    sign_command,
    sign_command_json,
    signed_message,
)
from agent.commands.keys import Keyring, TrustedKey
from agent.profile.model import ParameterSpec

NOW = 1_750_000_000_000
VEHICLE = "VIN-0001"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SCHEMAS = {
    "start_climate": {"temp": ParameterSpec(type="float", min=16, max=28, default=21.5),
                      "mode": ParameterSpec(type="enum", choices=["auto", "max_heat"])},
    "flash_lights": {"count": ParameterSpec(type="int", min=1, max=10, default=3)},
    "set_valet": {"enabled": ParameterSpec(type="bool")},
    "lock_doors": {},
}
RING = Keyring([TrustedKey("fleet-1", "fleet", KEY.public_key())])
EMPTY = StaticReplayView()
FUZZ_PAYLOADS = 100_000

TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
tokens = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")
param_values = st.one_of(
    st.booleans(), st.integers(-(2**63) + 1, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=64))


def verifier(schemas: dict[str, dict[str, ParameterSpec]] = SCHEMAS) -> CommandVerifier:
    return CommandVerifier(VEHICLE, RING, schemas, clock_ms=lambda: NOW)


def spec_for(value: object) -> ParameterSpec:
    """An unbounded spec that accepts ``value``."""
    if isinstance(value, bool):
        return ParameterSpec(type="bool")
    if isinstance(value, int):
        return ParameterSpec(type="int")
    if isinstance(value, float):
        return ParameterSpec(type="float")
    return ParameterSpec(type="enum", choices=[str(value)])


def typed(params: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {k: (type(v).__name__, repr(v)) for k, v in params.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_id=tokens, name=names, params=st.dictionaries(names, param_values, max_size=8),
       iat=st.integers(NOW - 3_000_000, NOW), lifetime=st.integers(1, 3_600_000), counter=st.integers(1, 2**63 - 1),
       as_json=st.booleans())
def test_valid_fields_round_trip(command_id: str, name: str, params: dict[str, Any], iat: int, lifetime: int,
                                 counter: int, as_json: bool) -> None:
    exp = iat + lifetime
    if exp + 30_000 < NOW:
        exp = NOW
        iat = max(iat, exp - 3_600_000)
    fields: dict[str, Any] = {"command_id": command_id, "vehicle_id": VEHICLE, "name": name, "params": params,
                              "issued_at_ms": iat, "expires_at_ms": exp, "counter": counter}
    if as_json:
        payload = sign_command_json(**fields, private_key=KEY, kid="fleet-1").encode()
    else:
        payload = sign_command(**fields, private_key=KEY, kid="fleet-1")
    v = verifier({name: {k: spec_for(value) for k, value in params.items()}})
    if len(payload) > v.max_bytes:
        return
    cmd = v.verify(payload, EMPTY)
    assert (cmd.command_id, cmd.vehicle_id, cmd.name, cmd.issued_at_ms, cmd.expires_at_ms, cmd.counter) == (
        command_id, VEHICLE, name, iat, exp, counter)
    assert typed(cmd.params) == typed(params)  # exact types: 1 stays int, 1.0 stays float, -0.0 stays -0.0
    assert (cmd.issuer, cmd.kid) == ("fleet", "fleet-1")


def check_only_rejections(v: CommandVerifier, payload: bytes) -> VerifiedCommand | None:
    try:
        return v.verify(payload, EMPTY)
    except CommandRejected as exc:
        assert exc.reason in REASONS, exc
        return None


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=5000))
def test_arbitrary_bytes_are_only_ever_rejected(payload: bytes) -> None:
    assert check_only_rejections(verifier(), payload) is None


cbor_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.floats(), st.text(max_size=20),
              st.binary(max_size=70), st.sampled_from(["v", "kid", "body", "sig", "fleet-1", 1, 2])),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.sampled_from(["v", "kid", "body", "sig", "id", "params", "x"])
                                            | st.text(max_size=5), inner, max_size=6)),
    max_leaves=30)


@settings(max_examples=1000, deadline=None)
@given(cbor_values)
def test_arbitrary_cbor_structures_are_only_ever_rejected(value: Any) -> None:
    assert check_only_rejections(verifier(), cbor2.dumps(value)) is None


@settings(max_examples=1000, deadline=None)
@given(cbor_values, st.booleans())
def test_arbitrary_signed_bodies_never_escape_the_parser(body_value: Any, as_map: bool) -> None:
    """Past the signature check: whatever a (buggy) issuer signs is parsed safely."""
    if as_map:
        body_value = {"id": "c1", "vehicle": VEHICLE, "name": "lock_doors", "params": {}, "iat": NOW,
                      "exp": NOW + 1, "ctr": 1, **(body_value if isinstance(body_value, dict) else {"x": body_value})}
    body = cbor2.dumps(body_value)
    payload = cbor2.dumps({"v": 1, "kid": "fleet-1", "body": body, "sig": KEY.sign(signed_message("fleet-1", body))})
    check_only_rejections(verifier(), payload)


# --------------------------------------------------------------------------- the 100k run


def corpus() -> list[bytes]:
    """Valid signed payloads in both forms, for every command."""
    out = []
    for n, (name, params) in enumerate([
            ("start_climate", {"mode": "auto", "temp": 22.5}), ("start_climate", {"mode": "max_heat"}),
            ("flash_lights", {"count": 7}), ("flash_lights", {}), ("set_valet", {"enabled": True}),
            ("lock_doors", {})]):
        fields: dict[str, Any] = {"command_id": f"cmd-{n}", "vehicle_id": VEHICLE, "name": name, "params": params,
                                  "issued_at_ms": NOW - 5000, "expires_at_ms": NOW + 60_000, "counter": 100 + n}
        out.append(sign_command(**fields, private_key=KEY, kid="fleet-1"))
        out.append(sign_command_json(**fields, private_key=KEY, kid="fleet-1").encode())
    return out


def random_cbor(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return rnd.randint(-(2**64), 2**64 - 1)
    if kind == 1:
        return rnd.choice([0.0, -0.0, 1.5, float("nan"), float("inf"), -1e308, rnd.random()])
    if kind == 2:
        return "".join(rnd.choice(TOKEN_CHARS + " /+#é\x00") for _ in range(rnd.randrange(70)))
    if kind == 3:
        return rnd.randbytes(rnd.choice([0, 1, 32, 63, 64, 65, rnd.randrange(200)]))
    if kind == 4:
        return rnd.choice([None, True, False, cbor2.undefined, cbor2.CBORSimpleValue(rnd.choice([0, 16, 255]))])
    if kind == 5:
        return rnd.choice(["v", "kid", "body", "sig", "fleet-1", VEHICLE, "lock_doors", 1, 2, NOW])
    if kind == 6:
        return cbor2.CBORTag(rnd.choice([0, 1, 2, 24, 258, 55799, 1234567]), rnd.randint(0, 5))
    if kind == 7:
        return rnd.randrange(2**63)
    if kind in (8, 9):
        return [random_cbor(rnd, depth + 1) for _ in range(rnd.randrange(6))]
    keys = ["v", "kid", "body", "sig", "id", "vehicle", "name", "params", "iat", "exp", "ctr", "x", ""]
    return {rnd.choice(keys): random_cbor(rnd, depth + 1) for _ in range(rnd.randrange(8))}


def mutate(rnd: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    base = rnd.choice(seeds)
    kind = rnd.randrange(10)
    if kind <= 2:
        data = bytearray(base)
        for _ in range(rnd.choice([1, 1, 2, 3, 8])):
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        return "bitflip", bytes(data)
    if kind == 3:
        return "truncate", base[:rnd.randrange(len(base))]
    if kind == 4:
        other = rnd.choice(seeds)
        return "splice", base[:rnd.randrange(len(base) + 1)] + other[rnd.randrange(len(other) + 1):]
    if kind == 5:
        i = rnd.randrange(len(base) + 1)
        chunk = rnd.choice([rnd.randbytes(rnd.randrange(1, 9)), base[i:i + rnd.randrange(1, 40)],
                            base * rnd.randrange(1, 40)])  # sometimes over the size cap
        return "insert", base[:i] + chunk + base[i:]
    if kind == 6:
        i = rnd.randrange(len(base))
        return "delete", base[:i] + base[i + rnd.randrange(1, 20):]
    if kind == 7:
        return "random_bytes", rnd.randbytes(rnd.randrange(300))
    if kind == 8:
        value = random_cbor(rnd)
        if rnd.random() < 0.5:  # a random body, properly signed: exercises everything past the signature
            body = cbor2.dumps(value)
            value = {"v": 1, "kid": "fleet-1", "body": body, "sig": KEY.sign(signed_message("fleet-1", body))}
        try:
            return "random_cbor", cbor2.dumps(value)
        except (cbor2.CBOREncodeError, ValueError, TypeError):
            return "random_cbor", b"\xa0"
    # a valid envelope around a mutated body, re-signed: the body parser sees hostile bytes
    outer = cbor2.loads(base) if base[:1] != b"{" else None
    if outer is None:
        doc = json.loads(base)
        body = base64.b64decode(doc["body"])
    else:
        body = outer["body"]
    data = bytearray(body)
    for _ in range(rnd.randrange(1, 4)):
        data[rnd.randrange(len(data))] = rnd.randrange(256)
    body = bytes(data)
    return "resigned_body", cbor2.dumps({"v": 1, "kid": "fleet-1", "body": body,
                                         "sig": KEY.sign(signed_message("fleet-1", body))})


def test_fuzz_100k_payloads_only_ever_rejected_never_forged() -> None:
    rnd = random.Random(20250615)
    v = verifier()
    seeds = corpus()
    genuine = {p: v.verify(p, EMPTY) for p in seeds}
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    accepted = 0
    start = time.perf_counter()
    for _ in range(FUZZ_PAYLOADS):
        kind, payload = mutate(rnd, seeds)
        kinds[kind] += 1
        try:
            cmd = v.verify(payload, EMPTY)
        except CommandRejected as exc:
            reasons[exc.reason] += 1
            continue
        # what verifies is a real signed command: an original, unless the fuzzer itself signed the body
        accepted += 1
        if kind in ("resigned_body", "random_cbor"):
            assert cmd.vehicle_id == VEHICLE and cmd.name in SCHEMAS
        else:
            assert cmd in genuine.values(), (kind, payload.hex())
    elapsed = time.perf_counter() - start
    assert sum(kinds.values()) == FUZZ_PAYLOADS
    assert set(reasons) <= set(REASONS)
    # the run reached deep into the checks, not just the CBOR decoder
    for reason in ("malformed", "bad_signature", "unknown_key", "unsupported_version", "too_large"):
        assert reasons[reason] > 0, reasons
    print(f"\nfuzz: {FUZZ_PAYLOADS} payloads in {elapsed:.1f} s ({FUZZ_PAYLOADS / elapsed:,.0f}/s); "
          f"accepted {accepted}; kinds {dict(kinds)}; reasons {dict(reasons.most_common())}")


def test_verification_throughput_is_reported() -> None:
    """How many full verifications (signature included) this machine does per second (reported, not asserted)."""
    v = verifier()
    payload = corpus()[0]
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        v.verify(payload, EMPTY)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        KEY.public_key().verify(cbor2.loads(payload)["sig"], signed_message("fleet-1", cbor2.loads(payload)["body"]))
    sig_only = time.perf_counter() - start
    print(f"\nverify(): {n / elapsed:,.0f}/s ({elapsed / n * 1e6:.0f} us each; Ed25519 alone with decoding "
          f"{sig_only / n * 1e6:.0f} us)")
    assert v.verify(payload, EMPTY).command_id == "cmd-0"
