"""The simulated ECUs: encoding rules, and a whole drive cycle on real virtual buses."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
import pytest
from cantools.database.can import Message
from cantools.database.errors import EncodeError

from agent.profile.loader import LoadedProfile, load_profile
from simulator import scenario as sc
from simulator.ecu import Ecu, MessageEncoder, not_simulated_reason, raw_range
from simulator.engine import Engine, Outgoing, Tick, next_slot
from simulator.scenario import DriveCycle, ScenarioConfig
from simulator.testing import run_simulator, virtual_buses

ROOT = Path(__file__).resolve().parent.parent
SIM_PROFILE = ROOT / "tests" / "data" / "sim" / "sim_ev.yaml"
BUSY_BUS = ROOT / "firmware_profiles" / "busy_bus" / "busy_bus.yaml"
TIME_SCALE = 40.0
# Door and lock phases long enough for several 100 ms body frames each at TIME_SCALE.
STORY = ScenarioConfig(unlock=16.0, door_open=16.0, door_close=16.0)


@pytest.fixture(scope="module")
def profile() -> LoadedProfile:
    return load_profile(SIM_PROFILE)


def decode(message: Message, data: bytes | bytearray) -> dict[str, Any]:
    return dict(message.decode(bytes(data)))  # type: ignore[arg-type]


def encoder_for(profile: LoadedProfile, name: str) -> MessageEncoder:
    ecu = Ecu(profile)
    return next(e for e in ecu.encoders if e.message.name == name)


def other_bytes_sum(message: Message, data: bytes, checksum: str) -> int:
    """What the simulator's checksum must be: sum of the bytes not holding it, mod 256."""
    probe: dict[str, Any] = dict(message.decode(data, decode_choices=False, scaling=False))  # type: ignore[arg-type]
    probe[checksum] = 0
    zero = message.encode(probe, scaling=False, strict=False)
    probe[checksum] = 0xFF
    ones = message.encode(probe, scaling=False, strict=False)
    return sum(b for i, b in enumerate(data) if zero[i] == ones[i]) % 256


# -- encoder rules (no bus) -----------------------------------------------------------------


def test_scenario_values_counter_and_checksum(profile: LoadedProfile) -> None:
    encoder = encoder_for(profile, "VCU_Drive")
    cycle = DriveCycle.for_signals(profile.catalog)
    state = cycle.state_at(cycle.hard_brake_time + 0.2)
    counters = []
    for _ in range(20):
        data = encoder.encode(state)
        decoded = decode(encoder.message, data)
        assert decoded["VehicleSpeed"] == pytest.approx(state[sc.SPEED], abs=0.01)
        assert decoded["BrakePedal"] == pytest.approx(state[sc.BRAKE], abs=0.4)
        assert str(decoded["GearSelected"]) == "D"
        assert decoded["VCU_Drive_CRC"] == other_bytes_sum(encoder.message, data, "VCU_Drive_CRC")
        counters.append(decoded["VCU_Drive_Counter"])
    assert counters == [i % 16 for i in range(20)]  # 4-bit counter wraps at 15


def test_big_endian_checksum_covers_the_right_byte(profile: LoadedProfile) -> None:
    encoder = encoder_for(profile, "SAS_Steering")
    state = DriveCycle.for_signals(profile.catalog).state_at(10.0)
    data = encoder.encode(state)
    decoded = decode(encoder.message, data)
    assert data[3] == decoded["SAS_Checksum"] == (data[0] + data[1] + data[2] + sum(data[4:])) % 256
    assert decoded["SteeringAngle"] == pytest.approx(state[sc.STEERING], abs=0.05)


def test_defaults_come_from_start_values_clamped_into_range(profile: LoadedProfile) -> None:
    encoder = encoder_for(profile, "Body_Misc")
    decoded = decode(encoder.message, encoder.encode({}))
    assert decoded["AmbientTemp"] == 20.0  # GenSigStartValue 120 * 0.5 - 40
    assert decoded["WiperLevel"] == 10  # 0 is below the minimum 10
    motor = encoder_for(profile, "MCU_Motor").message
    assert decode(motor, encoder_for(profile, "MCU_Motor").encode({}))["MotorTemp"] == 25


def test_out_of_range_and_unknown_values_are_contained(profile: LoadedProfile) -> None:
    encoder = encoder_for(profile, "VCU_Drive")
    data = encoder.encode({sc.SPEED: 1000.0, sc.SELECTED_GEAR: "WARP", sc.BRAKE: -5.0})
    decoded = decode(encoder.message, data)
    assert decoded["VehicleSpeed"] == pytest.approx(327.67)
    assert decoded["BrakePedal"] == 0.0
    assert str(decoded["GearSelected"]) == "P"  # start value 0
    assert encoder.stats.clamped == 2
    assert encoder.stats.unknown_choices == 1


def test_multiplexed_pages_alternate(profile: LoadedProfile) -> None:
    encoder = encoder_for(profile, "BMS_Cells")
    state = DriveCycle.for_signals(profile.catalog).state_at(0.0)
    pages = [decode(encoder.message, encoder.encode(state)) for _ in range(4)]
    assert [p["CellMux"] for p in pages] == [0, 1, 0, 1]
    cell = "Vehicle.Powertrain.TractionBattery.Module2.CellVoltage3"
    assert pages[1]["M2Cell3"] == pytest.approx(state[cell], abs=0.001)


def test_frame_flags_follow_the_database(profile: LoadedProfile) -> None:
    state = DriveCycle.for_signals(profile.catalog).state_at(0.0)
    fd = encoder_for(profile, "MCU_Motor").frame(state)
    assert fd.is_fd and fd.bitrate_switch and len(fd.data) == 16 and not fd.is_extended_id
    ext = encoder_for(profile, "BMS_Cells").frame(state)
    assert ext.is_extended_id and ext.arbitration_id == 0x18FF1000 and not ext.is_fd


def test_raw_range_narrows_bit_range_by_min_max(profile: LoadedProfile) -> None:
    drive = profile.databases["powertrain"].get_message_by_name("VCU_Drive")
    assert raw_range(drive.get_signal_by_name("GearCurrent")) == (-1, 8)
    assert raw_range(drive.get_signal_by_name("VCU_Drive_Counter")) == (0, 15)
    assert raw_range(drive.get_signal_by_name("AccelPedal")) == (0, 250)


def test_the_telematics_units_own_and_diagnostic_messages_are_not_simulated() -> None:
    busy = load_profile(BUSY_BUS)
    db = busy.databases["powertrain"]
    assert not_simulated_reason(db.get_message_by_name("TCU_01")) is not None
    assert not_simulated_reason(db.get_message_by_name("ECM_DiagResponse")) is not None
    assert not_simulated_reason(db.get_message_by_name("ECM_01")) is None
    ecu = Ecu(busy)
    sent = {e.message.name for e in ecu.encoders}
    assert "TCU_01" not in sent and "OBD_FunctionalRequest" not in sent and "ECM_01" in sent
    assert set(ecu.not_sent) | {("powertrain", n) for n in sent} == {
        ("powertrain", m.name) for m in db.messages}


def test_an_unencodable_message_is_counted_not_fatal(profile: LoadedProfile,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = encoder_for(profile, "VCU_Drive")

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise EncodeError("overlapping signals")

    monkeypatch.setattr(encoder.message, "encode", refuse)
    assert encoder.frames({}) == []
    assert encoder.frames({}) == []
    assert encoder.stats.encode_errors == 2


class _Broken:
    def start(self, start_ns: int) -> int:
        return start_ns

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int | None]:
        raise ZeroDivisionError("bug in a source")


def test_an_engine_failure_is_reported_by_stop() -> None:
    engine = Engine({}, [_Broken()])
    engine.start()
    assert engine.exhausted.wait(5) and engine.failed
    with pytest.raises(RuntimeError, match="engine failed") as exc:
        engine.stop()
    assert isinstance(exc.value.__cause__, ZeroDivisionError)


def test_next_slot_keeps_the_grid_and_skips_missed_slots() -> None:
    assert next_slot(1000, 10, 0, 1005) == (1, 1010, 0)
    assert next_slot(1000, 10, 0, 1012) == (2, 1020, 1)  # slot 1 already passed: skipped
    assert next_slot(1000, 10, 3, 1031) == (4, 1040, 0)


# -- a whole cycle on virtual buses ------------------------------------------------------------


@dataclass
class Recording:
    frames: dict[str, list[can.Message]]
    cycle: DriveCycle
    profile: LoadedProfile
    frames_sent: dict[str, int]
    scenario_time: Callable[[float], float]


@pytest.fixture(scope="module")
def recording(profile: LoadedProfile) -> Iterator[Recording]:
    buses = virtual_buses(profile)
    receivers = {name: can.Bus(interface="virtual", channel=channel)
                 for name, (_, channel) in buses.items()}
    try:
        cycle = DriveCycle.for_signals(profile.catalog, STORY)
        with run_simulator(profile, buses=buses, scenario=cycle, time_scale=TIME_SCALE) as sim:
            assert sim.wait_finished(timeout=60)
        frames: dict[str, list[can.Message]] = {name: [] for name in receivers}
        for name, bus in receivers.items():
            while (message := bus.recv(timeout=0)) is not None:
                frames[name].append(message)
        yield Recording(frames, cycle, profile, sim.frames_sent, sim.scenario_time)
    finally:
        for bus in receivers.values():
            bus.shutdown()


def by_id(frames: list[can.Message]) -> dict[int, list[can.Message]]:
    out: dict[int, list[can.Message]] = collections.defaultdict(list)
    for frame in frames:
        out[frame.arbitration_id].append(frame)
    return out


def test_every_message_is_sent_at_its_cycle_time(recording: Recording) -> None:
    for bus, frames in recording.frames.items():
        counts = {i: len(f) for i, f in by_id(frames).items()}
        db = recording.profile.databases[bus]
        assert {m.frame_id for m in db.messages} == set(counts)  # every message appears
        periods = {m.frame_id: m.cycle_time for m in db.messages if m.cycle_time}
        fastest = min(periods, key=lambda frame_id: periods[frame_id])
        assert counts[fastest] > 100
        for frame_id, period in periods.items():
            # Frames of a message per frame of the fastest one: the ratio of cycle times.
            expected = counts[fastest] * periods[fastest] / period
            assert abs(counts[frame_id] - expected) <= max(2.0, 0.15 * expected), (
                hex(frame_id), counts[frame_id], expected)
    # The message without a cycle time (odometer, 12 V) goes out on change: far less often.
    status = by_id(recording.frames["powertrain"])[0x3E8]
    assert 2 <= len(status) < len(by_id(recording.frames["powertrain"])[0x1F0])


def test_counters_increment_and_checksums_hold(recording: Recording) -> None:
    checked = 0
    for bus, frames in recording.frames.items():
        db = recording.profile.databases[bus]
        for frame_id, sent in by_id(frames).items():
            message = db.get_message_by_frame_id(frame_id)
            for signal in message.signals:
                name = signal.name
                if name.endswith("Counter"):
                    lo, hi = raw_range(signal)
                    values = [decode(message, f.data)[name] for f in sent]
                    steps = {(b - a) % (hi - lo + 1) for a, b in itertools.pairwise(values)}
                    assert steps == {1}, (message.name, values[:20])
                    checked += 1
                if name.endswith(("CRC", "Checksum")):
                    for frame in sent:
                        assert decode(message, frame.data)[name] == other_bytes_sum(
                            message, bytes(frame.data), name)
                    checked += 1
    assert checked == 8  # 4 counters, 4 checksums in the test databases


def test_all_mux_pages_appear(recording: Recording) -> None:
    message = recording.profile.databases["powertrain"].get_message_by_name("BMS_Cells")
    sent = by_id(recording.frames["powertrain"])[message.frame_id]
    pages = [decode(message, f.data)["CellMux"] for f in sent]
    assert set(pages) == {0, 1}
    assert all(a != b for a, b in itertools.pairwise(pages))
    assert all(f.is_extended_id for f in sent)


def test_fd_frames_on_the_fd_bus_only(recording: Recording) -> None:
    motor = by_id(recording.frames["powertrain"])[0xD0]
    assert all(f.is_fd and f.bitrate_switch and len(f.data) == 16 for f in motor)
    assert not any(f.is_fd for f in recording.frames["body"])


def test_decoded_frames_tell_the_drive_story(recording: Recording) -> None:
    drive_db = recording.profile.databases["powertrain"].get_message_by_name("VCU_Drive")
    drive = [(f.timestamp, decode(drive_db, f.data))
             for f in by_id(recording.frames["powertrain"])[drive_db.frame_id]]
    doors_db = recording.profile.databases["body"].get_message_by_name("BCM_Doors")
    doors = [decode(doors_db, f.data) for f in by_id(recording.frames["body"])[doors_db.frame_id]]
    story: list[str] = []

    def note(event: str) -> None:
        if not story or story[-1] != event:
            story.append(event)

    for decoded in doors:
        note(f"door {decoded['DoorFL']} {decoded['DriverLock']}")
    assert story == ["door Closed LOCKED", "door Closed UNLOCKED", "door Open UNLOCKED",
                     "door Closed UNLOCKED", "door Open UNLOCKED", "door Closed UNLOCKED",
                     "door Closed LOCKED"]
    hard = [(t, d) for t, d in drive if d["BrakePedal"] > 80 and d["VehicleSpeed"] > 50]
    assert hard, "no frame shows the hard brake"
    first_time, _first = hard[0]
    edges = sum(1 for (_, a), (_, b) in itertools.pairwise(drive)
                if not (a["BrakePedal"] > 80 and a["VehicleSpeed"] > 50)
                and b["BrakePedal"] > 80 and b["VehicleSpeed"] > 50)
    assert edges == 1
    # A frame cannot carry the hard brake before the scenario reached it (causal bound; the
    # frame's wall-clock timestamp maps to scenario time through the recorded start).
    assert recording.scenario_time(first_time) >= recording.cycle.hard_brake_time - 0.01
    assert str(drive[0][1]["GearSelected"]) == "P" and str(drive[-1][1]["GearSelected"]) == "P"
    assert max(d["VehicleSpeed"] for _, d in drive) == pytest.approx(90.0, abs=3.0)
    assert drive[-1][1]["VehicleSpeed"] == 0.0


def test_frames_sent_counts_match_what_arrived(recording: Recording) -> None:
    assert {n: len(f) for n, f in recording.frames.items()} == recording.frames_sent


SHIPPED = sorted((ROOT / "firmware_profiles").glob("*/*.yaml"))


@pytest.mark.parametrize("profile_path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profiles_encode_the_scenario_faithfully(profile_path: Path) -> None:
    shipped = load_profile(profile_path)
    ecu = Ecu(shipped)
    cycle = DriveCycle.for_signals(shipped.catalog)
    canonical = {(e.bus, e.message.frame_id, e.signal.name): n for n, e in shipped.catalog.items()}
    seen: set[str] = set()
    for t in (0.0, 12.0, cycle.hard_brake_time + 0.3):
        state = cycle.state_at(t)
        for encoder in ecu.encoders:
            for _ in encoder.pages:  # every mux page once
                frame = encoder.frame(state)
                assert len(frame.data) == encoder.message.length
                for signal, value in decode(encoder.message, frame.data).items():
                    name = canonical.get((encoder.bus, encoder.message.frame_id, signal))
                    if name is None:
                        continue
                    seen.add(name)
                    want = state[name]
                    if isinstance(want, str):
                        assert str(value) == want, (name, t)
                    else:
                        scale = abs(encoder.message.get_signal_by_name(signal).scale)
                        assert value == pytest.approx(want, abs=scale), (name, t)
    assert seen == set(shipped.catalog)  # every catalog signal is on a simulated message
    assert sum(e.stats.clamped + e.stats.unknown_choices for e in ecu.encoders) == 0
