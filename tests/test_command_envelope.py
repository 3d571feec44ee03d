"""Command envelopes: exact format, every rejection reason, parameter schemas, trusted keys files."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands import envelope as env
from agent.commands.envelope import (
    REASONS,
    SIGNING_DOMAIN,
    CommandRejected,
    CommandVerifier,
    StaticReplayView,
    VerifiedCommand,
    sign_command,
    sign_command_json,
    signed_message,
)
from agent.commands.keys import (
    Keyring,
    TrustedKey,
    add_trusted_key,
    generate_signing_key,
    load_keyring,
    load_signing_key,
    public_entry,
)
from agent.commands.schema import check_parameters, spec_problems
from agent.errors import ConfigError, RejectedInput
from agent.profile.model import ParameterSpec

NOW = 1_750_000_000_000  # 2025-06-15, ms
VEHICLE = "WVWZZZ1JZXW000001"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
SCHEMAS: dict[str, dict[str, ParameterSpec]] = {
    "lock_doors": {},
    "flash_lights": {"count": ParameterSpec(type="int", min=1, max=10, default=3)},
    "start_climate": {"temp": ParameterSpec(type="float", min=16, max=28, default=21.5),
                      "mode": ParameterSpec(type="enum", choices=["auto", "max_heat", "max_cool"])},
    "set_valet": {"enabled": ParameterSpec(type="bool")},
}
EMPTY = StaticReplayView()


def keyring(*extra: TrustedKey) -> Keyring:
    return Keyring([TrustedKey("fleet-1", "fleet", KEY.public_key()), *extra])


def verifier(now: int = NOW, ring: Keyring | None = None, **kw: Any) -> CommandVerifier:
    return CommandVerifier(VEHICLE, ring or keyring(), SCHEMAS, clock_ms=lambda: now, **kw)


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"command_id": "cmd-0001", "vehicle_id": VEHICLE, "name": "start_climate",
                            "params": {"mode": "auto", "temp": 22.5}, "issued_at_ms": NOW - 1000,
                            "expires_at_ms": NOW + 60_000, "counter": 7}
    base.update(overrides)
    return base


def signed(private_key: Ed25519PrivateKey = KEY, kid: str = "fleet-1", **overrides: Any) -> bytes:
    return sign_command(**fields(**overrides), private_key=private_key, kid=kid)


def raw_envelope(body: bytes, *, kid: str = "fleet-1", key: Ed25519PrivateKey = KEY, **extra: Any) -> bytes:
    """An envelope around arbitrary (signed) body bytes, bypassing the signer's checks."""
    outer: dict[str, Any] = {"v": 1, "kid": kid, "body": body, "sig": key.sign(signed_message(kid, body))}
    outer.update(extra)
    return cbor2.dumps(outer)


def body_of(**overrides: Any) -> dict[str, Any]:
    f = fields()
    body = {"id": f["command_id"], "vehicle": f["vehicle_id"], "name": f["name"], "params": f["params"],
            "iat": f["issued_at_ms"], "exp": f["expires_at_ms"], "ctr": f["counter"]}
    body.update(overrides)
    return body


def rejected(payload: object, reason: str, replay: StaticReplayView = EMPTY, v: CommandVerifier | None = None,
             ) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        (v or verifier()).verify(payload, replay)  # type: ignore[arg-type]
    assert info.value.reason == reason, info.value
    assert reason in REASONS
    assert isinstance(info.value, RejectedInput)
    return info.value


# --------------------------------------------------------------------------- format


def test_valid_command_is_verified_with_defaults_and_float_normalisation() -> None:
    cmd = verifier().verify(signed(params={"mode": "max_heat"}), EMPTY)
    assert cmd == VerifiedCommand(
        command_id="cmd-0001", vehicle_id=VEHICLE, issuer="fleet", kid="fleet-1", name="start_climate",
        params={"mode": "max_heat", "temp": 21.5}, issued_at_ms=NOW - 1000, expires_at_ms=NOW + 60_000,
        counter=7, digest=cmd.digest)
    # an integer for a float parameter (what a JavaScript encoder sends) becomes a float
    cmd = verifier().verify(signed(params={"mode": "auto", "temp": 20}), EMPTY)
    assert cmd.params["temp"] == 20.0 and type(cmd.params["temp"]) is float


def test_envelope_format_is_exactly_as_documented() -> None:
    payload = signed()
    outer = cbor2.loads(payload)
    assert set(outer) == {"v", "kid", "body", "sig"} and outer["v"] == 1 and outer["kid"] == "fleet-1"
    assert len(outer["sig"]) == 64
    body = cbor2.loads(outer["body"])
    assert body == body_of()
    assert outer["body"] == cbor2.dumps(body, canonical=True)  # canonical body
    KEY.public_key().verify(outer["sig"], SIGNING_DOMAIN + b"fleet-1\x00" + outer["body"])
    cmd = verifier().verify(payload, EMPTY)
    assert cmd.digest == hashlib.sha256(outer["body"]).hexdigest()


def test_json_form_carries_the_same_signed_body() -> None:
    text = sign_command_json(**fields(), private_key=KEY, kid="fleet-1")
    doc = json.loads(text)
    assert set(doc) == {"v", "kid", "body", "sig"}
    assert base64.b64decode(doc["body"]) == cbor2.loads(signed())["body"]
    cmd_json = verifier().verify(text.encode(), EMPTY)
    cmd_cbor = verifier().verify(signed(), EMPTY)
    assert cmd_json == cmd_cbor
    # leading whitespace is still JSON
    assert verifier().verify(b" \n" + text.encode(), EMPTY) == cmd_cbor


def test_bytearray_and_memoryview_payloads_are_accepted() -> None:
    payload = signed()
    assert verifier().verify(bytearray(payload), EMPTY) == verifier().verify(memoryview(payload), EMPTY)


# --------------------------------------------------------------------------- each reason


def test_too_large_is_checked_before_parsing() -> None:
    v = verifier(max_bytes=600)
    rejected(b"\xff" * 601, "too_large", v=v)  # garbage, but the size is what is reported
    rejected(memoryview(b"{" * 601), "too_large", v=v)
    big = signed(command_id="c" * 64, params={"mode": "auto"})
    assert len(big) <= 600
    v.verify(big, EMPTY)
    rejected(big, "too_large", v=verifier(max_bytes=len(big) - 1))


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"\xa0", b"not cbor at all", b"[1, 2]", b"{", b"{}", b'{"v": 1}',
    cbor2.dumps([1, 2, 3]),
    cbor2.dumps({"v": "1", "kid": "fleet-1", "body": b"x", "sig": b"s" * 64}),
    cbor2.dumps({"v": True, "kid": "fleet-1", "body": b"x", "sig": b"s" * 64}),
    cbor2.dumps({"v": 1, "kid": "fleet-1", "sig": b"s" * 64}),  # no body
    cbor2.dumps({"v": 1, "kid": "fleet-1", "body": "text", "sig": b"s" * 64}),
    cbor2.dumps({"v": 1, "kid": "fleet-1", "body": b"", "sig": b"s" * 64}),
    cbor2.dumps({"v": 1, "kid": "fleet-1", "body": b"x", "sig": b"s" * 64, "extra": 1}),
    cbor2.dumps({"v": 1, "kid": "fleet/1", "body": b"x", "sig": b"s" * 64}),
    cbor2.dumps({"v": 1, "kid": 7, "body": b"x", "sig": b"s" * 64}),
    cbor2.dumps({"v": 1, 2: 3, "body": b"x", "sig": b"s" * 64}),  # non-text key
], ids=lambda p: p[:12].hex())
def test_malformed_envelopes(payload: bytes) -> None:
    error = rejected(payload, "malformed")
    assert error.command_id is None  # nothing unauthenticated is attributed


def test_strict_cbor_profile_of_the_envelope() -> None:
    good = signed()
    rejected(good + b"\x00", "malformed")  # trailing bytes
    rejected(cbor2.dumps(cbor2.CBORTag(55799, cbor2.loads(good))), "malformed")  # self-describe tag
    rejected(cbor2.dumps(cbor2.CBORTag(9999, cbor2.loads(good))), "malformed")  # unknown tag
    rejected(b"\xbf" + good[1:] + b"\xff", "malformed")  # indefinite-length map
    # duplicate key: the map header says 5 pairs, "v" twice
    rejected(b"\xa5" + good[1:] + b"\x61v\x01", "malformed")
    deep = b"\x81" * 50 + b"\x00"
    rejected(deep, "malformed")


@pytest.mark.parametrize("body", [
    b"\xff", cbor2.dumps([1]), cbor2.dumps(body_of()) + b"\x00",
    cbor2.dumps({k: v for k, v in body_of().items() if k != "ctr"}),
    cbor2.dumps({**body_of(), "extra": 1}),
    cbor2.dumps(body_of(id="has space")), cbor2.dumps(body_of(id="")), cbor2.dumps(body_of(id="x" * 65)),
    cbor2.dumps(body_of(id="a/b")), cbor2.dumps(body_of(id=5)),
    cbor2.dumps(body_of(vehicle="V+1")), cbor2.dumps(body_of(name="1abc")), cbor2.dumps(body_of(name="a.b")),
    cbor2.dumps(body_of(params=[])), cbor2.dumps(body_of(params={"ok": None})),
    cbor2.dumps(body_of(params={"x": float("nan")})), cbor2.dumps(body_of(params={"x": float("inf")})),
    cbor2.dumps(body_of(params={"x": [1]})), cbor2.dumps(body_of(params={"x": b"bytes"})),
    cbor2.dumps(body_of(params={"x": 1 << 63})), cbor2.dumps(body_of(params={"x": "t" * 257})),
    cbor2.dumps(body_of(params={"bad name": 1})), cbor2.dumps(body_of(params={f"p{i}": i for i in range(33)})),
    cbor2.dumps(body_of(iat=1.5)), cbor2.dumps(body_of(iat=-1)), cbor2.dumps(body_of(exp=True)),
    cbor2.dumps(body_of(exp=1 << 60)), cbor2.dumps(body_of(ctr=0)), cbor2.dumps(body_of(ctr=1 << 63)),
    cbor2.dumps(body_of(ctr=cbor2.CBORTag(2, b"\x01"))),  # bignum
    cbor2.dumps(body_of(exp=NOW - 1000)),  # exp == iat
    cbor2.dumps(body_of(exp=NOW - 2000)),  # exp before iat
])
def test_signed_but_malformed_bodies(body: bytes) -> None:
    rejected(raw_envelope(body), "malformed")


def test_unsupported_version() -> None:
    outer = cbor2.loads(signed())
    rejected(cbor2.dumps({**outer, "v": 2}), "unsupported_version")
    rejected(cbor2.dumps({"v": 2, "whatever": 1}), "unsupported_version")  # nothing else is read


def test_bad_signature() -> None:
    outer = cbor2.loads(signed())
    rejected(cbor2.dumps({k: v for k, v in outer.items() if k != "sig"}), "bad_signature")  # unsigned
    rejected(cbor2.dumps({**outer, "sig": outer["sig"][:63]}), "bad_signature")
    rejected(cbor2.dumps({**outer, "sig": "text"}), "bad_signature")
    flipped = bytes([outer["sig"][0] ^ 1]) + outer["sig"][1:]
    rejected(cbor2.dumps({**outer, "sig": flipped}), "bad_signature")
    # body changed after signing (a different counter)
    body = cbor2.dumps(body_of(ctr=8), canonical=True)
    rejected(cbor2.dumps({**outer, "body": body}), "bad_signature")
    # signed by a key that is not the one behind the kid
    error = rejected(signed(private_key=OTHER_KEY), "bad_signature")
    assert error.command_id is None


def test_relabelled_kid_breaks_the_signature() -> None:
    ring = keyring(TrustedKey("fleet-2", "fleet", OTHER_KEY.public_key()))
    outer = cbor2.loads(signed())
    # even a message signed by fleet-2's key over the same body is not valid under kid fleet-1
    sig2 = OTHER_KEY.sign(signed_message("fleet-2", outer["body"]))
    rejected(cbor2.dumps({**outer, "sig": sig2}), "bad_signature", v=verifier(ring=ring))
    rejected(cbor2.dumps({**outer, "kid": "fleet-2"}), "bad_signature", v=verifier(ring=ring))
    assert verifier(ring=ring).verify(cbor2.dumps({**outer, "kid": "fleet-2", "sig": sig2}), EMPTY).kid == "fleet-2"


def test_unknown_key() -> None:
    rejected(signed(kid="fleet-9"), "unknown_key")
    outer = cbor2.loads(signed())
    rejected(cbor2.dumps({k: v for k, v in outer.items() if k != "kid"}), "unknown_key")


def test_key_not_valid_outside_its_window_with_skew() -> None:
    late = TrustedKey("fleet-1", "fleet", KEY.public_key(), not_before_ms=NOW + 30_001)
    early = TrustedKey("fleet-1", "fleet", KEY.public_key(), not_after_ms=NOW - 30_001)
    rejected(signed(), "key_not_valid", v=verifier(ring=Keyring([late])))
    rejected(signed(), "key_not_valid", v=verifier(ring=Keyring([early])))
    edge = TrustedKey("fleet-1", "fleet", KEY.public_key(), not_before_ms=NOW + 30_000, not_after_ms=NOW + 40_000)
    assert verifier(ring=Keyring([edge])).verify(signed(), EMPTY).counter == 7


def test_wrong_vehicle() -> None:
    error = rejected(signed(vehicle_id="WVWZZZ1JZXW000002"), "wrong_vehicle")
    assert (error.command_id, error.issuer, error.name) == ("cmd-0001", "fleet", "start_climate")


def test_expired_and_not_yet_valid_with_skew_edges() -> None:
    exp = NOW + 60_000
    assert verifier(now=exp + 30_000).verify(signed(), EMPTY)
    rejected(signed(), "expired", v=verifier(now=exp + 30_001))
    iat = NOW - 1000
    assert verifier(now=iat - 30_000).verify(signed(), EMPTY)
    rejected(signed(), "not_yet_valid", v=verifier(now=iat - 30_001))
    rejected(signed(), "not_yet_valid", v=verifier(now=iat - 1, max_skew_ms=0))
    # an agent whose clock was never set rejects everything instead of trusting anything
    rejected(signed(), "not_yet_valid", v=verifier(now=0))


def test_lifetime_too_long() -> None:
    rejected(signed(expires_at_ms=NOW - 1000 + 3_600_001), "lifetime_too_long")
    assert verifier().verify(signed(expires_at_ms=NOW - 1000 + 3_600_000), EMPTY)
    assert verifier(max_lifetime_ms=7_200_000).verify(signed(expires_at_ms=NOW + 3_600_000), EMPTY)


def test_replayed_id() -> None:
    error = rejected(signed(), "replayed_id", replay=StaticReplayView(seen_ids=frozenset({"cmd-0001"})))
    assert error.command_id == "cmd-0001"
    # a redelivery is recognised even after its command expired, so its result can be sent again
    rejected(signed(), "replayed_id", replay=StaticReplayView(seen_ids=frozenset({"cmd-0001"})),
             v=verifier(now=NOW + 10 * 3_600_000))


def test_replayed_counter_per_issuer() -> None:
    replay = StaticReplayView(counters={"fleet": 7, "other": 100})
    rejected(signed(counter=7), "replayed_counter", replay=replay)
    rejected(signed(counter=3), "replayed_counter", replay=replay)
    assert verifier().verify(signed(counter=8), replay).counter == 8
    # counters belong to the issuer, not the key: a rotated key continues the same sequence
    ring = keyring(TrustedKey("fleet-2", "fleet", OTHER_KEY.public_key()))
    rejected(signed(private_key=OTHER_KEY, kid="fleet-2", counter=7), "replayed_counter", replay=replay,
             v=verifier(ring=ring))


def test_replay_state_reset() -> None:
    replay = StaticReplayView(reset_ms=NOW - 500)
    rejected(signed(), "replay_state_reset", replay=replay)  # issued at NOW - 1000
    assert verifier().verify(signed(issued_at_ms=NOW - 500), replay)


def test_unknown_command() -> None:
    rejected(signed(name="open_trunk", params={}), "unknown_command")
    rejected(signed(name="Start_Climate"), "unknown_command")  # names are case-sensitive


@pytest.mark.parametrize(("name", "params", "expect"), [
    ("start_climate", {"temp": 22.0}, "mode: required"),
    ("start_climate", {"mode": "turbo"}, "mode: not one of"),
    ("start_climate", {"mode": 1}, "mode: expected text"),
    ("start_climate", {"mode": "auto", "temp": 28.01}, "temp: above the maximum"),
    ("start_climate", {"mode": "auto", "temp": 15}, "temp: below the minimum"),
    ("start_climate", {"mode": "auto", "temp": True}, "temp: expected a number, got bool"),
    ("start_climate", {"mode": "auto", "temp": "22"}, "temp: expected a number"),
    ("start_climate", {"mode": "auto", "temp": 1 << 60}, "too large to be a float"),
    ("start_climate", {"mode": "auto", "fan": 3}, "unknown parameters ['fan']"),
    ("flash_lights", {"count": 2.0}, "count: expected an integer, got float"),
    ("flash_lights", {"count": True}, "count: expected an integer, got bool"),
    ("flash_lights", {"count": 0}, "count: below the minimum"),
    ("flash_lights", {"count": 11}, "count: above the maximum"),
    ("set_valet", {"enabled": 1}, "enabled: expected a bool, got int"),
    ("set_valet", {}, "enabled: required"),
    ("lock_doors", {"force": True}, "unknown parameters"),
])
def test_bad_parameters(name: str, params: dict[str, Any], expect: str) -> None:
    error = rejected(signed(name=name, params=params), "bad_parameters")
    assert expect in error.detail
    assert error.command_id == "cmd-0001"


def test_good_parameters() -> None:
    v = verifier()
    assert v.verify(signed(name="flash_lights", params={}), EMPTY).params == {"count": 3}
    assert v.verify(signed(name="flash_lights", params={"count": 10}), EMPTY).params == {"count": 10}
    assert v.verify(signed(name="set_valet", params={"enabled": False}), EMPTY).params == {"enabled": False}
    assert v.verify(signed(name="lock_doors", params={}), EMPTY).params == {}


def test_check_order_first_failure_wins() -> None:
    # wrong vehicle and expired and unknown command: the vehicle is checked first
    rejected(signed(vehicle_id="OTHER", name="nope", params={}), "wrong_vehicle", v=verifier(now=NOW * 2))
    # bad signature beats everything that is inside the body
    rejected(signed(private_key=OTHER_KEY, vehicle_id="OTHER"), "bad_signature")
    # replayed counter is reported before expiry
    rejected(signed(), "replayed_counter", replay=StaticReplayView(counters={"fleet": 9}), v=verifier(now=NOW * 2))


def test_json_strictness() -> None:
    doc = json.loads(sign_command_json(**fields(), private_key=KEY, kid="fleet-1"))
    good = json.dumps(doc)
    assert verifier().verify(good.encode(), EMPTY)
    rejected(good[:-1].encode() + b', "v": 1}', "malformed")  # duplicate key
    rejected(json.dumps({**doc, "v": float("nan")}).encode(), "malformed")  # NaN literal
    rejected(json.dumps({**doc, "body": doc["body"] + "!"}).encode(), "malformed")
    rejected(json.dumps({**doc, "body": 5}).encode(), "malformed")
    rejected(json.dumps({**doc, "sig": doc["sig"][:-4]}).encode(), "bad_signature")
    rejected(json.dumps({**doc, "sig": "not base64!"}).encode(), "bad_signature")
    rejected(json.dumps({**doc, "v": 2}).encode(), "unsupported_version")
    rejected(b'{"v":' + b"[" * 2000 + b"]" * 2000 + b"}", "malformed")  # nesting beyond the recursion limit
    rejected(b'{"v":' + b"[" * 30000 + b"]" * 30000 + b"}", "malformed", v=verifier(max_bytes=65_536))
    rejected(b'{"v": 1, "kid": "\xff"}', "malformed")  # not UTF-8


def test_non_bytes_payload_is_rejected() -> None:
    rejected("text", "malformed")
    rejected(None, "malformed")


def test_signer_refuses_what_the_verifier_would_reject() -> None:
    for bad in ({"command_id": "a b"}, {"vehicle_id": ""}, {"name": "9lives"}, {"params": {"x": float("nan")}},
                {"params": {"x": None}}, {"counter": 0}, {"expires_at_ms": NOW - 1000}, {"issued_at_ms": -5},
                {"params": {"x": object()}}):
        with pytest.raises(ValueError):
            signed(**bad)
    with pytest.raises(ValueError):
        signed(kid="bad kid")


def test_verifier_construction_is_checked() -> None:
    with pytest.raises(ValueError):
        CommandVerifier("bad/vehicle", keyring(), SCHEMAS, clock_ms=lambda: NOW)
    with pytest.raises(ValueError):
        CommandVerifier(VEHICLE, keyring(), {"bad name": {}}, clock_ms=lambda: NOW)
    settings = env.VerifierSettings(max_bytes=1024, max_skew_ms=0, max_lifetime_ms=1000)
    v = CommandVerifier.from_settings(VEHICLE, keyring(), SCHEMAS, settings, clock_ms=lambda: NOW)
    assert (v.max_bytes, v.max_skew_ms, v.max_lifetime_ms) == (1024, 0, 1000)


# --------------------------------------------------------------------------- parameter specs


def test_spec_problems_for_the_profile_loader() -> None:
    assert spec_problems(ParameterSpec(type="float", min=16, max=28, default=21.5)) == []
    assert spec_problems(ParameterSpec(type="enum", choices=["a", "b"], default="a")) == []
    assert "needs choices" in spec_problems(ParameterSpec(type="enum"))[0]
    assert "choices must be unique" in spec_problems(ParameterSpec(type="enum", choices=["a", "a"]))[0]
    assert "choices apply to enums" in spec_problems(ParameterSpec(type="int", choices=["a"]))[0]
    assert "above max" in spec_problems(ParameterSpec(type="int", min=5, max=1))[0]
    assert "min applies" in spec_problems(ParameterSpec(type="bool", min=0))[0]
    assert "finite" in spec_problems(ParameterSpec(type="float", max=float("inf")))[0]
    assert "default 30" in spec_problems(ParameterSpec(type="int", max=10, default=30))[0]
    assert "default 'x'" in spec_problems(ParameterSpec(type="enum", choices=["a"], default="x"))[0]
    assert "default 1.5" in spec_problems(ParameterSpec(type="int", default=1.5))[0]


def test_a_default_that_breaks_its_spec_is_not_applied_silently() -> None:
    with pytest.raises(ValueError, match=r"count \(default\): above the maximum"):
        check_parameters({"count": ParameterSpec(type="int", max=5, default=9)}, {})


# --------------------------------------------------------------------------- trusted keys file


def write_keys(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def raw_b64(key: Ed25519PrivateKey) -> str:
    return public_entry(key, kid="x", issuer="y").public_key


def pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_load_keyring_raw_and_pem_keys_with_windows(tmp_path: Path) -> None:
    pem_block = "\n".join("      " + line for line in pem(OTHER_KEY).splitlines())
    path = write_keys(tmp_path / "keys.yaml", f"""\
version: 1
keys:
  - kid: fleet-1
    issuer: fleet
    public_key: {raw_b64(KEY)}
  - kid: ops.2025:b
    issuer: ops
    public_key: |
{pem_block}
    not_before: 2025-01-01T00:00:00Z
    not_after: "2026-01-01T00:00:00+00:00"
""")
    ring = load_keyring(path)
    assert len(ring) == 2 and ring.issuers == {"fleet", "ops"}
    ops = ring.get("ops.2025:b")
    assert ops is not None and ops.issuer == "ops"
    assert ops.not_before_ms == 1_735_689_600_000 and ops.not_after_ms == 1_767_225_600_000
    assert verifier(ring=ring).verify(signed(private_key=OTHER_KEY, kid="ops.2025:b"), EMPTY).issuer == "ops"
    # JSON is accepted too
    doc = {"version": 1, "keys": [{"kid": "k", "issuer": "i", "public_key": raw_b64(KEY)}]}
    assert load_keyring(write_keys(tmp_path / "keys.json", json.dumps(doc))).get("k") is not None


@pytest.mark.parametrize(("text", "expect"), [
    ("version: 2\nkeys: []\n", "version"),
    ("version: 1\nkeys: []\n", "keys"),
    ("version: 1\n", "keys: required key is missing"),
    ("version: 1\nkeys:\n  - kid: a b\n    issuer: f\n    public_key: {k}\n", "keys[0].kid"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f/x\n    public_key: {k}\n", "keys[0].issuer"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: '!!!'\n", "base64"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {short}\n", "32 bytes, this one is 16"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {k}\n    colour: red\n", "unknown key"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {k}\n"
     "    not_before: 2026-01-01T00:00:00Z\n    not_after: 2025-01-01T00:00:00Z\n", "not_before must be earlier"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {k}\n    not_after: 2025-01-01T00:00:00\n",
     "timezone"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {k}\n"
     "  - kid: a\n    issuer: g\n    public_key: {k2}\n", "duplicate kid 'a'"),
    ("version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {k}\n"
     "  - kid: b\n    issuer: g\n    public_key: {k}\n", "same public key as keys[0]"),
    ("version: 1\nkeys: [\n", "YAML syntax error"),
])
def test_trusted_keys_file_errors_are_located(tmp_path: Path, text: str, expect: str) -> None:
    text = text.format(k=raw_b64(KEY), k2=raw_b64(OTHER_KEY), short=base64.b64encode(b"x" * 16).decode())
    path = write_keys(tmp_path / "keys.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_keyring(path)
    message = str(info.value)
    assert str(path) in message and expect in message, message


def test_trusted_keys_file_must_be_an_ed25519_pem_and_protected(tmp_path: Path) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    block = "\n".join("      " + line for line in ec_pem.splitlines())
    path = write_keys(tmp_path / "keys.yaml", f"version: 1\nkeys:\n  - kid: a\n    issuer: f\n"
                      f"    public_key: |\n{block}\n")
    with pytest.raises(ConfigError, match="must be an Ed25519 key"):
        load_keyring(path)
    good = f"version: 1\nkeys:\n  - kid: a\n    issuer: f\n    public_key: {raw_b64(KEY)}\n"
    with pytest.raises(ConfigError, match="lets group or others write it"):
        load_keyring(write_keys(tmp_path / "open.yaml", good, 0o666))
    with pytest.raises(ConfigError, match="not found"):
        load_keyring(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_keyring(tmp_path)


def test_keyring_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate key id"):
        Keyring([TrustedKey("a", "f", KEY.public_key()), TrustedKey("a", "g", OTHER_KEY.public_key())])
    with pytest.raises(ValueError, match="same public key"):
        Keyring([TrustedKey("a", "f", KEY.public_key()), TrustedKey("b", "g", KEY.public_key())])


def test_generate_signing_key_end_to_end(tmp_path: Path) -> None:
    key_path = tmp_path / "backend" / "command-signing.pem"
    not_after = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    entry = generate_signing_key(key_path, kid="fleet-2025", issuer="fleet", not_after=not_after)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not [p for p in key_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert "kid: fleet-2025" in entry.to_yaml() and "not_after: '2030-01-01T00:00:00Z'" in entry.to_yaml()
    with pytest.raises(FileExistsError):
        generate_signing_key(key_path, kid="fleet-2025", issuer="fleet")
    keys_file = tmp_path / "vehicle" / "trusted-command-keys.yaml"
    add_trusted_key(keys_file, entry)
    second = generate_signing_key(tmp_path / "k2.pem", kid="ops-1", issuer="ops")
    add_trusted_key(keys_file, second)
    with pytest.raises(ConfigError, match="already has kid"):
        add_trusted_key(keys_file, second)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o644
    ring = load_keyring(keys_file)
    assert [k.kid for k in ring] == ["fleet-2025", "ops-1"]
    private = load_signing_key(key_path)
    cmd = verifier(ring=ring).verify(signed(private_key=private, kid="fleet-2025"), EMPTY)
    assert (cmd.issuer, cmd.kid) == ("fleet", "fleet-2025")
    # overwriting is explicit, and gives a different key
    again = generate_signing_key(key_path, kid="fleet-2025", issuer="fleet", overwrite=True)
    assert again.public_key != entry.public_key


def test_load_signing_key_refuses_unsafe_or_wrong_files(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    generate_signing_key(path, kid="a", issuer="b")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by its owner only"):
        load_signing_key(path)
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(ec_path, 0o600)
    with pytest.raises(ConfigError, match="must be an Ed25519 key"):
        load_signing_key(ec_path)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"junk")
    os.chmod(junk, 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_signing_key(junk)
    with pytest.raises(ConfigError, match="not found"):
        load_signing_key(tmp_path / "nope.pem")
