"""The selective decoder agrees with cantools on every signal it decodes."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode import MessageDecoder
from agent.errors import FrameRejected
from agent.profile.loader import load_profile

UNIT = Path(__file__).parent / "data" / "unit" / "unit.yaml"
PROFILES = sorted(Path(__file__).parent.parent.glob("firmware_profiles/*/*.yaml"))


@functools.cache
def _decoders(profile_path: Path) -> list[tuple[MessageDecoder, object]]:
    profile = load_profile(profile_path)
    out = []
    for bus in profile.spec.buses:
        db = profile.databases[bus.name]
        for message in db.messages:
            wanted = [e for e in profile.catalog.values() if e.message is message]
            if wanted:
                out.append((MessageDecoder(message, wanted, fd=bus.fd), message))
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)  # type: ignore[arg-type]
    return a == b and type(a) is type(b)


def _check_against_cantools(decoder: MessageDecoder, message: object, data: bytes) -> None:
    try:
        reference = message.decode(data, decode_choices=True, scaling=True,  # type: ignore[attr-defined]
                                   allow_truncated=False, allow_excess=False)
    except cantools.database.DecodeError:
        with pytest.raises(FrameRejected) as info:
            decoder.decode(data)
        assert info.value.reason == "unknown_multiplexer"
        return
    ours = dict(decoder.decode(data).values)
    by_signal = {e: e for e in ours}
    names = {f.name: f for f in decoder.fields if f.emit}
    for canonical, field in names.items():
        signal_name = next(s.name for s in message.signals if decoder._index.get(s.name) is not None  # type: ignore[attr-defined]
                           and decoder.fields[decoder._index[s.name]] is field)
        expected = reference.get(signal_name)
        if expected is None:
            assert canonical not in ours  # multiplexed out
            continue
        expected_value = str(expected) if hasattr(expected, "name") else expected
        if isinstance(expected_value, float) and not math.isfinite(expected_value):
            assert canonical not in ours
            continue
        lo, hi = field.minimum, field.maximum
        outside = not isinstance(expected_value, str) and (
            (lo is not None and expected_value < lo) or (hi is not None and expected_value > hi))
        if outside and field.out_of_range == "drop":
            assert canonical not in ours
        elif outside and field.out_of_range == "clamp":
            assert lo is not None and hi is not None
            assert lo <= ours[canonical] <= hi  # type: ignore[operator]
        else:
            assert _same(ours[canonical], expected_value), (canonical, ours[canonical], expected_value)
    assert by_signal.keys() <= names.keys()


@pytest.mark.parametrize("profile_path", [UNIT, *PROFILES], ids=lambda p: p.stem)
@settings(max_examples=300, deadline=None)
@given(seed=st.randoms(use_true_random=False))
def test_matches_cantools_on_random_payloads(profile_path: Path, seed: object) -> None:
    for decoder, message in _decoders(profile_path):
        data = bytes(seed.getrandbits(8) for _ in range(message.length))  # type: ignore[attr-defined]
        _check_against_cantools(decoder, message, data)


def test_multiplexed_signals_follow_the_selector() -> None:
    (decoder, message), = [(d, m) for d, m in _decoders(UNIT) if m.name == "Cells"]  # type: ignore[attr-defined]
    page0 = message.encode({"Page": 0, "CellA": 3.3})  # type: ignore[attr-defined]
    page1 = message.encode({"Page": 1, "CellB": 3.1, "CellC": 3.9})  # type: ignore[attr-defined]
    assert dict(decoder.decode(page0).values) == {"Vehicle.CellA": pytest.approx(3.3)}
    assert dict(decoder.decode(page1).values) == {"Vehicle.CellC": pytest.approx(3.9)}


def test_big_endian_signed_and_choices() -> None:
    (decoder, message), = [(d, m) for d, m in _decoders(UNIT) if m.name == "BodyBE"]  # type: ignore[attr-defined]
    data = message.encode({"Voltage": 13.8, "Torque": -1234.5, "DoorState": 1, "Lock": 1})  # type: ignore[attr-defined]
    values = dict(decoder.decode(data).values)
    assert values["Vehicle.Voltage"] == pytest.approx(13.8)
    assert values["Vehicle.Torque"] == pytest.approx(-1234.5)
    assert values["Vehicle.Door"] == "Open"
    assert values["Vehicle.Lock"] == "LOCKED"


def test_wrong_length_is_rejected_with_reason() -> None:
    (decoder, _), = [(d, m) for d, m in _decoders(UNIT) if m.name == "Dynamics"]  # type: ignore[attr-defined]
    with pytest.raises(FrameRejected) as info:
        decoder.decode(b"\x00" * 5)
    assert info.value.reason == "wrong_length"
    assert "5 bytes" in info.value.detail and "8" in info.value.detail


def test_out_of_range_policies() -> None:
    (decoder, message), = [(d, m) for d, m in _decoders(UNIT) if m.name == "Dynamics"]  # type: ignore[attr-defined]
    # Speed raw 0xFFFF = 655.35 km/h > 300: dropped (default); Temp is "clamp".
    data = bytearray(message.encode({"Speed": 10, "Brake": 0, "Steering": 0, "Gear": 0,  # type: ignore[attr-defined]
                                     "Dyn_Counter": 0, "Temp": 20}))
    data[0:2] = b"\xff\xff"
    result = decoder.decode(bytes(data))
    values = dict(result.values)
    assert "Vehicle.Speed" not in values and "Vehicle.Speed" in result.out_of_range
    assert values["Vehicle.Temp"] == 20
    data[6] = 0xFF  # 255 - 40 = 215: still in range; nothing to clamp
    assert dict(decoder.decode(bytes(data)).values)["Vehicle.Temp"] == 215


def test_float_and_extended_message() -> None:
    (decoder, message), = [(d, m) for d, m in _decoders(UNIT) if m.name == "ExtFloat"]  # type: ignore[attr-defined]
    assert decoder.extended and decoder.frame_id == message.frame_id == 0x18FECA15  # type: ignore[attr-defined]
    data = message.encode({"Pressure": -2.5, "Flow": 1010.5})  # type: ignore[attr-defined]
    values = dict(decoder.decode(data).values)
    assert values["Vehicle.Pressure"] == -2.5
    assert values["Vehicle.Flow"] == pytest.approx(1010.5)


def test_relevant_bits_ignore_counters_and_unneeded_signals() -> None:
    (decoder, message), = [(d, m) for d, m in _decoders(UNIT) if m.name == "Dynamics"]  # type: ignore[attr-defined]
    base = {"Speed": 50.0, "Brake": 10, "Steering": -12.5, "Gear": 3, "Dyn_Counter": 0, "Temp": 20}
    first = decoder.relevant_bits(message.encode(base))  # type: ignore[attr-defined]
    assert decoder.relevant_bits(message.encode({**base, "Dyn_Counter": 7})) == first  # type: ignore[attr-defined]
    assert decoder.relevant_bits(message.encode({**base, "Speed": 50.01})) != first  # type: ignore[attr-defined]
    (body, body_message), = [(d, m) for d, m in _decoders(UNIT) if m.name == "BodyBE"]  # type: ignore[attr-defined]
    a = body.relevant_bits(body_message.encode({"Voltage": 12.0, "Torque": 5, "DoorState": 0, "Lock": 0}))  # type: ignore[attr-defined]
    b = body.relevant_bits(body_message.encode({"Voltage": 12.0, "Torque": 5, "DoorState": 0, "Lock": 1}))  # type: ignore[attr-defined]
    assert a != b  # big-endian single-bit signal is inside the mask
