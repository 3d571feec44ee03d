"""The ingest benchmark's machinery on a little traffic: behaviour only, no timing."""

from __future__ import annotations

from pathlib import Path

import can
import pytest

import simulator.replaybus  # registers the sim-replay interface in-process
from agent.profile.loader import LoadedProfile, load_profile
from agent.records import Event, Sample
from bench.bench_pipeline import PROFILE, ListBus, measure_startup, peak_rss_kib, run_naive, run_ours
from bench.traffic import generate, write_candump


@pytest.fixture(scope="module")
def profile() -> LoadedProfile:
    return load_profile(PROFILE)


@pytest.fixture(scope="module")
def traffic(profile: LoadedProfile) -> list[can.Message]:
    return generate(profile, 1.0)


def test_traffic_is_the_busy_bus_deterministic_and_in_time_order(
        profile: LoadedProfile, traffic: list[can.Message]) -> None:
    again = generate(profile, 1.0)
    assert [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in again] == \
        [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in traffic]
    stamps = [m.timestamp for m in traffic]
    assert stamps == sorted(stamps) and stamps[0] >= 0.0 and stamps[-1] < 1.0
    known = {m.frame_id for m in profile.databases["powertrain"].messages}
    assert {m.arbitration_id for m in traffic} <= known
    assert 3000 < len(traffic) < 5000  # the profile's ~3,700 frames/s


def test_both_paths_emit_identical_records(profile: LoadedProfile,
                                           traffic: list[can.Message]) -> None:
    ours = run_ours(profile, traffic)
    naive = run_naive(profile, traffic)
    assert ours.frames == naive.frames == len(traffic)
    assert ours.records == naive.records
    assert any(isinstance(r, Sample) and r.rule == "speed_10hz" for r in ours.records)
    assert any(isinstance(r, Sample) and r.rule == "doors_locks" for r in ours.records)
    # The agent decodes a fraction of what the baseline decodes, for the same records.
    assert naive.counters["decoded"] == len(traffic)
    assert 0 < ours.counters["decoded"] < len(traffic) // 4
    assert ours.counters["not_needed"] > len(traffic) // 2


def test_hard_brake_event_is_the_same_on_both_paths(profile: LoadedProfile) -> None:
    # The drive cycle brakes hard at ~29.2 s; a 2 s window around it is enough to see it.
    frames = [m for m in generate(profile, 31.5) if m.timestamp >= 26.0]
    ours, naive = run_ours(profile, frames), run_naive(profile, frames)
    events = [r for r in ours.records if isinstance(r, Event)]
    assert len(events) == 1 and events[0].rule == "hard_brake"
    assert ours.records == naive.records


def test_a_difference_would_be_seen(profile: LoadedProfile, traffic: list[can.Message]) -> None:
    without_speed = [m for m in traffic if m.arbitration_id != 0x0C8]  # ESP_VehicleSpeed
    assert run_ours(profile, without_speed).records != run_naive(profile, traffic).records


def test_list_bus_hands_out_frames_in_order_then_nothing() -> None:
    frames = [can.Message(arbitration_id=i, data=[i]) for i in range(3)]
    bus = ListBus(frames)
    try:
        assert [bus.recv(0).arbitration_id for _ in range(3)] == [0, 1, 2]  # type: ignore[union-attr]
        assert bus.recv(0) is None
        assert bus.drained.is_set()
        with pytest.raises(can.CanOperationError):
            bus.send(frames[0])
    finally:
        bus.shutdown()


def _write_log(tmp_path: Path) -> tuple[Path, list[can.Message]]:
    frames = [
        can.Message(timestamp=10.0, arbitration_id=0x0C8, data=bytes([1, 2, 3, 4, 5, 6, 7, 8])),
        can.Message(timestamp=10.01, arbitration_id=0x18DAF110, is_extended_id=True, data=b"\x02\x10"),
        can.Message(timestamp=10.02, arbitration_id=0x3A0, data=b""),
    ]
    return write_candump(frames, tmp_path / "small.log"), frames


def test_replay_bus_replays_a_log_then_idles(tmp_path: Path) -> None:
    path, frames = _write_log(tmp_path)
    with can.Bus(interface=simulator.replaybus.INTERFACE_NAME, channel=str(path)) as bus:
        got = [bus.recv(1.0) for _ in frames]
        assert [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in got if m] == \
            [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in frames]
        assert bus.recv(0) is None  # end of log: idle, not an error
        assert isinstance(bus, simulator.replaybus.ReplayBus)
        assert bus.frames_replayed == 3 and bus.exhausted
        with pytest.raises(can.CanOperationError):
            bus.send(frames[0])


def test_replay_bus_paced_keeps_order_and_honours_filters(tmp_path: Path) -> None:
    path, _ = _write_log(tmp_path)
    bus = simulator.replaybus.ReplayBus(channel=path, speed=100.0,
                                        can_filters=[{"can_id": 0x3A0, "can_mask": 0x7FF}])
    try:
        msg = bus.recv(5.0)
        assert msg is not None and msg.arbitration_id == 0x3A0
        assert bus.recv(0) is None
    finally:
        bus.shutdown()


def test_replay_bus_stops_at_an_unreadable_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    path.write_text("(1.000000) can0 0C8#0102\nthis is not candump\n(1.1) can0 0C8#0304\n",
                    encoding="utf-8")
    bus = simulator.replaybus.ReplayBus(channel=path)
    try:
        first = bus.recv(0)
        assert first is not None and bytes(first.data) == b"\x01\x02"
        assert bus.recv(0) is None
        assert bus.unreadable == 1 and bus.exhausted
    finally:
        bus.shutdown()


@pytest.mark.parametrize("channel", [None, "missing.log", "notes.txt"])
def test_replay_bus_refuses_what_it_cannot_replay(tmp_path: Path, channel: str | None) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(can.CanInitializationError):
        simulator.replaybus.ReplayBus(channel=None if channel is None else tmp_path / channel)


def test_agent_cli_reads_its_first_frame_from_a_replayed_log(
        tmp_path: Path, traffic: list[can.Message]) -> None:
    path = write_candump(traffic, tmp_path / "busy.log")
    (startup,) = measure_startup(path, runs=1)
    assert startup > 0


def test_peak_rss_is_read_from_proc_status() -> None:
    assert peak_rss_kib("Name:\tpython\nVmHWM:\t   12345 kB\n") == 12345
    assert peak_rss_kib() > 0
