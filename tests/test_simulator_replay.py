"""Log replay: a recorded log comes back onto the buses in order, routed by channel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import can
import pytest

from agent.profile.loader import LoadedProfile, load_profile
from simulator.replay import ReplayRunner, Router
from simulator.testing import virtual_buses

SIM_PROFILE = Path(__file__).resolve().parent / "data" / "sim" / "sim_ev.yaml"
SPAN = 0.5  # seconds of recorded traffic


@pytest.fixture(scope="module")
def profile() -> LoadedProfile:
    return load_profile(SIM_PROFILE)


def recorded_frames() -> list[can.Message]:
    """Traffic as candump would see it on the profile's channels vcan0 and vcan1."""
    frames = []
    for i in range(50):
        t = 1_700_000_000.0 + i * SPAN / 49
        if i % 5 == 4:
            frames.append(can.Message(timestamp=t, channel="vcan1", arbitration_id=0x2A0,
                                      is_extended_id=False, data=bytes([i, 0, 0, 0, 0, 0, 0, i])))
        elif i % 5 == 3:
            frames.append(can.Message(timestamp=t, channel="vcan0", arbitration_id=0x18FF1000,
                                      is_extended_id=True, data=bytes([i % 2, i, 1, 2, 3, 4, 5, 6])))
        elif i % 5 == 2:
            frames.append(can.Message(timestamp=t, channel="vcan0", arbitration_id=0xD0,
                                      is_extended_id=False, is_fd=True, bitrate_switch=True,
                                      data=bytes(range(i, i + 16))))
        else:
            frames.append(can.Message(timestamp=t, channel="vcan0", arbitration_id=0xC8,
                                      is_extended_id=False, data=bytes([i] * 8)))
    return frames


@pytest.fixture()
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "drive.log"
    with can.Logger(path) as writer:  # .log -> candump format (CanutilsLogWriter)
        for frame in recorded_frames():
            writer.on_message_received(frame)
    return path


Receivers = tuple[dict[str, tuple[str, str]], dict[str, can.BusABC]]


@pytest.fixture()
def receivers(profile: LoadedProfile) -> Iterator[Receivers]:
    buses = virtual_buses(profile)
    rx = {name: can.Bus(interface="virtual", channel=ch) for name, (_, ch) in buses.items()}
    yield buses, rx
    for bus in rx.values():
        bus.shutdown()


def drain(bus: can.BusABC) -> list[can.Message]:
    out = []
    while (message := bus.recv(timeout=0)) is not None:
        out.append(message)
    return out


def same(a: can.Message, b: can.Message) -> bool:
    return (a.arbitration_id == b.arbitration_id and a.is_extended_id == b.is_extended_id
            and a.is_fd == b.is_fd and bytes(a.data) == bytes(b.data))


def test_replay_reproduces_frames_in_order_on_their_buses(profile: LoadedProfile, receivers: Receivers,
        log_file: Path) -> None:
    buses, rx = receivers
    runner = ReplayRunner(profile, log_file, buses=buses, speed=4.0)
    with runner:
        assert runner.wait(timeout=30)
    expected = recorded_frames()
    for bus, channel in (("powertrain", "vcan0"), ("body", "vcan1")):
        got = drain(rx[bus])
        want = [f for f in expected if f.channel == channel]
        assert len(got) == len(want)
        assert all(same(g, w) for g, w in zip(got, want, strict=True))
        # Sent on the recorded schedule, 4x faster: never ahead of it.
        start = runner.start_wall_ns / 1e9
        first = expected[0].timestamp
        for g, w in zip(got, want, strict=True):
            assert g.timestamp - start >= (w.timestamp - first) / 4.0 - 0.001
    assert runner.replay.sent == 50 and runner.replay.skipped == 0
    assert runner.frames_sent == {"powertrain": 40, "body": 10}


def test_channel_map_and_single_target(profile: LoadedProfile, receivers: Receivers,
        log_file: Path) -> None:
    buses, rx = receivers
    # Everything onto the body bus: one target takes all frames, in log order.
    with ReplayRunner(profile, log_file, buses={"body": buses["body"]}, only=["body"],
                      speed=50.0) as runner:
        assert runner.wait(timeout=30)
    got = drain(rx["body"])
    assert [bytes(f.data) for f in got] == [bytes(f.data) for f in recorded_frames()]
    # A map swaps the channels.
    with ReplayRunner(profile, log_file, buses=buses, speed=50.0,
                      channel_map={"vcan0": "body", "vcan1": "powertrain"}) as runner:
        assert runner.wait(timeout=30)
    assert len(drain(rx["body"])) == 40 and len(drain(rx["powertrain"])) == 10


def test_frames_of_unknown_channels_are_skipped_and_counted(profile: LoadedProfile, tmp_path: Path) -> None:
    path = tmp_path / "other.log"
    with can.Logger(path) as writer:
        for i in range(3):
            writer.on_message_received(can.Message(timestamp=i * 0.01, channel="can7",
                                                   arbitration_id=0x100, is_extended_id=False))
    with ReplayRunner(profile, path, buses=virtual_buses(profile), speed=100.0) as runner:
        assert runner.wait(timeout=30)
    assert runner.replay.skipped == 3 and runner.replay.sent == 0
    router = Router({"powertrain": {"vcan0", "sim-pt"}, "body": {"vcan1"}}, {"can9": "body"})
    assert router.route("can7") is None and router.route("vcan1") == "body"
    assert router.route("sim-pt") == router.route("powertrain") == "powertrain"
    assert router.route("can9") == "body" and router.route(None) is None


def test_other_log_formats(profile: LoadedProfile, receivers: Receivers,
                           tmp_path: Path) -> None:
    buses, rx = receivers
    path = tmp_path / "drive.asc"
    with can.Logger(path) as writer:
        for i in range(5):
            writer.on_message_received(can.Message(timestamp=100 + i * 0.01, channel=0,
                                                   arbitration_id=0x2B0 + i,
                                                   is_extended_id=False, data=bytes([i])))
    with ReplayRunner(profile, path, buses={"body": buses["body"]}, only=["body"],
                      speed=10.0) as runner:
        assert runner.wait(timeout=30)
    assert [f.arbitration_id for f in drain(rx["body"])] == [0x2B0 + i for i in range(5)]


def test_bad_replay_arguments(profile: LoadedProfile, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ReplayRunner(profile, tmp_path / "missing.log")
    path = tmp_path / "x.log"
    path.write_text("")
    with pytest.raises(ValueError, match="speed"):
        ReplayRunner(profile, path, speed=0)
    with pytest.raises(ValueError, match="nowhere"):
        ReplayRunner(profile, path, channel_map={"can0": "nowhere"})


def test_an_empty_log_finishes_at_once(profile: LoadedProfile, tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_text("")
    with ReplayRunner(profile, path, buses=virtual_buses(profile)) as runner:
        assert runner.wait(timeout=10)
    assert runner.replay.sent == 0


def test_a_malformed_log_stops_the_replay_with_a_reason(profile: LoadedProfile,
                                                       receivers: Receivers,
                                                       tmp_path: Path) -> None:
    buses, rx = receivers
    path = tmp_path / "broken.log"
    path.write_text("(1.00) vcan1 2A0#01\n(1.01) vcan1 2A0#02\nthis is not candump\n"
                    "(1.02) vcan1 2A0#03\n")
    with ReplayRunner(profile, path, buses={"body": buses["body"]}, only=["body"],
                      speed=10.0) as runner:
        assert runner.wait(timeout=30)
    assert [bytes(f.data) for f in drain(rx["body"])] == [b"\x01", b"\x02"]
    assert runner.replay.error is not None and "after 2 frames" in runner.replay.error
    with pytest.raises(ValueError, match="unknown log format"):
        ReplayRunner(profile, _touch(tmp_path / "trace.unknownformat"))


def _touch(path: Path) -> Path:
    path.write_text("")
    return path
