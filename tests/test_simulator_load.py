"""Load mode: frame lengths on the wire, and a bus filled to roughly the asked share."""

from __future__ import annotations

from pathlib import Path

import can
import pytest

from agent.profile.loader import LoadedProfile, load_profile
from simulator.load import (
    LoadGenerator,
    LoadRunner,
    classic_frame_bits,
    crc15,
    fd_frame_time,
    frame_time,
    stuff_bit_count,
)
from simulator.testing import virtual_buses

SIM_PROFILE = Path(__file__).resolve().parent / "data" / "sim" / "sim_ev.yaml"


@pytest.fixture(scope="module")
def profile() -> LoadedProfile:
    return load_profile(SIM_PROFILE)


def bits_of(data: bytes) -> list[int]:
    return [(byte >> i) & 1 for byte in data for i in range(7, -1, -1)]


def test_crc15_check_value() -> None:
    assert crc15(bits_of(b"123456789")) == 0x059E  # CRC-15/CAN catalogue check value


def test_stuff_bits_count_the_inserted_bit_in_the_next_run() -> None:
    assert stuff_bit_count([0] * 4) == 0
    assert stuff_bit_count([0] * 5) == 1
    assert stuff_bit_count([1] * 5 + [0] * 4) == 2  # the stuffed 0 plus four 0s make five
    assert stuff_bit_count([0, 1] * 40) == 0


def test_classic_frame_lengths() -> None:
    # 19 header bits and a CRC of zero: 34 dominant bits, a stuff bit after every 5th,
    # then CRC delimiter, ACK, EOF and intermission (13).
    assert classic_frame_bits(0x000, False, b"") == 34 + 6 + 13
    # DLC 8 is 1000: 15 zeros (3 stuff bits), "1" with the stuffed 1, then 67 zeros
    # (13 stuff bits); this frame's CRC needs none.
    assert classic_frame_bits(0x000, False, bytes(8)) == 98 + 16 + 13
    # The bound from the CAN spec: 8n + 47 + floor((34 + 8n - 1) / 4) for standard frames.
    for data in (bytes(8), b"\xff" * 8, bytes(range(8)), b"\x0f\xf0" * 4):
        assert 8 * 8 + 47 <= classic_frame_bits(0x7F, False, data) <= 8 * 8 + 47 + 24
    assert classic_frame_bits(0x18FF1000, True, bytes(8)) > classic_frame_bits(0x100, False,
                                                                                 bytes(8))


def test_frame_time_uses_the_data_bitrate_for_fd() -> None:
    classic = can.Message(arbitration_id=0x100, is_extended_id=False, data=bytes(8))
    assert frame_time(classic, 500_000) == classic_frame_bits(0x100, False, bytes(8)) / 500_000
    fd = can.Message(arbitration_id=0x100, is_extended_id=False, is_fd=True, bitrate_switch=True,
                     data=bytes(64))
    fast = frame_time(fd, 500_000, 2_000_000)
    slow = fd_frame_time(False, 64, 500_000, 2_000_000, bitrate_switch=False)
    assert 0 < fast < slow
    assert slow > 64 * 8 / 500_000


@pytest.mark.parametrize(("bus", "percent"), [("body", 30.0), ("powertrain", 20.0)])
def test_load_reaches_roughly_the_asked_share(profile: LoadedProfile, bus: str,
                                              percent: float) -> None:
    buses = virtual_buses(profile)
    receiver = can.Bus(interface="virtual", channel=buses[bus][1])
    spec = next(b for b in profile.spec.buses if b.name == bus)
    try:
        runner = LoadRunner(profile, percent, buses={bus: buses[bus]}, only=[bus])
        with runner:
            runner.wait_for(lambda: False, timeout=0.5)  # let it run for half a second
            elapsed = runner.elapsed()
        frames = []
        while (message := receiver.recv(timeout=0)) is not None:
            frames.append(message)
    finally:
        receiver.shutdown()
    assert len(frames) == runner.frames_sent[bus] > 50
    busy = sum(frame_time(f, spec.bitrate, spec.data_bitrate) for f in frames)
    achieved = 100.0 * busy / elapsed
    # Never above the target (the budget is spent before it is earned); a loose lower bound
    # because a loaded test machine may not keep up.
    assert percent * 0.4 < achieved <= percent * 1.05
    db = profile.databases[bus]
    ids = {m.frame_id: m for m in db.messages}
    for frame in frames:
        expected = ids[frame.arbitration_id]
        assert len(frame.data) == expected.length
        expected.decode(bytes(frame.data))  # valid frames, not noise
    assert {f.arbitration_id for f in frames} == set(ids)


def test_load_generator_refuses_impossible_targets(profile: LoadedProfile) -> None:
    with pytest.raises(ValueError, match="percent"):
        LoadGenerator(profile, "body", 0)
    with pytest.raises(ValueError, match="percent"):
        LoadGenerator(profile, "body", 150)
    with pytest.raises(ValueError, match="unknown bus"):
        LoadGenerator(profile, "chassis", 50)
