"""Smoke test of bench/bench_commands.py: its parts on a tiny workload, a real broker and vehicle.

Behaviour only (every side accepts every command, every command succeeds and is timed, the
report renders); no timing thresholds. The only orderings asserted are causal: a command's
final result cannot be acknowledged before its first frame went out.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from agent.commands.keys import load_keyring
from agent.profile.loader import load_profile
from bench import bench_commands as bc
from tests.command_harness import make_command_key


def test_relaxed_profile_only_drops_rate_limits(tmp_path: Path) -> None:
    relaxed = load_profile(bc.relaxed_profile(tmp_path))
    shipped = load_profile(bc.EV)
    assert [c.name for c in relaxed.spec.commands] == [c.name for c in shipped.spec.commands]
    assert any(c.rate_limit is not None for c in shipped.spec.commands)
    assert all(c.rate_limit is None for c in relaxed.spec.commands)
    assert [c.action for c in relaxed.spec.commands] == [c.action for c in shipped.spec.commands]
    assert set(relaxed.catalog) == set(shipped.catalog)


def test_naive_check_accepts_signed_and_refuses_tampered(tmp_path: Path) -> None:
    key, trusted = make_command_key(tmp_path, kid=bc.KID, issuer=bc.ISSUER)
    trusted_key = load_keyring(trusted).get(bc.KID)
    assert trusted_key is not None
    keys = {bc.KID: trusted_key.public_key}
    payload = bc.as_json(bc.signed_payloads(key, 1, 7)[0])
    envelope = bc.naive_verify(payload, keys)
    assert envelope["kid"] == bc.KID
    sig = bytearray(base64.b64decode(envelope["sig"]))
    sig[10] ^= 0x01
    tampered = payload.replace(envelope["sig"].encode(), base64.b64encode(bytes(sig)))
    assert tampered != payload
    with pytest.raises(ValueError, match="bad signature"):
        bc.naive_verify(tampered, keys)


def test_verification_measures_every_side(tmp_path: Path) -> None:
    result = bc.run_verify(bc.VerifyPlan(commands=8, rounds=2, stored=3), tmp_path)
    assert set(result.per_s) == set(bc.VERIFY_SIDES)
    assert all(len(rates) == 2 and all(r > 0 for r in rates) for rates in result.per_s.values())


def test_latency_run_times_every_command_and_report_renders(tmp_path: Path) -> None:
    started = time.monotonic()
    latency = bc.run_latency(4, tmp_path / "latency")
    assert [t.name for t in latency.timings] == ["unlock_doors", "lock_doors"] * 2
    assert all(t.state == "succeeded" for t in latency.timings)
    for t in latency.timings:
        assert t.to_first_frame_ms is not None and t.to_first_frame_ms >= 0
        assert t.to_result_ack_ms is not None and t.to_result_ack_ms > t.to_first_frame_ms
        assert t.confirmed_after_ms is not None and t.confirmed_after_ms >= 0
        assert t.end_to_end_ms > 0
    verify = bc.run_verify(bc.VerifyPlan(commands=4, rounds=1, stored=1), tmp_path / "verify")
    report = bc.Report(bc.Plan.quick(), "cmd", verify, latency, "machine", time.monotonic() - started)
    text = bc.render(report)
    assert text.startswith(bc.TITLE + "\n")
    assert "Reading: " in text and "Latency: " in text
    for side in bc.VERIFY_SIDES:
        assert text.count(f"\n| {side} |") == 1
    assert "| (a) receipt at agent" in text and "| (c) cloud publish" in text
