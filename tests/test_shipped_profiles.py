"""The shipped vehicle profiles and their CAN databases.

Every profile under firmware_profiles/ must load through the real loader; the databases
must have the features the simulator, the agent and the benchmark rely on (canonical
names, enumeration names, multiplexing, CAN FD, 29-bit identifiers, counters/CRCs); and
the busy-bus database must produce the documented traffic.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cantools.database.can import Database, Message, Signal

from agent.profile.loader import LoadedProfile, load_profile
from agent.profile.model import AggregateRule, OnChangeRule, PeriodicRule, TriggerRule

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "firmware_profiles"
PROFILE_FILES = sorted(PROFILES_DIR.glob("*/*.yaml"))
DBC_FILES = sorted(PROFILES_DIR.glob("*/*.dbc"))
GENERATOR = ROOT / "scripts" / "gen_busy_bus_dbc.py"

BITRATE = 500_000
STUFFING = 1.15

HARD_BRAKE = {
    "type": "trigger",
    "name": "hard_brake",
    "condition": "Vehicle.Chassis.Brake.PedalPosition > 80 and Vehicle.Speed > 50",
    "mode": "rising_edge",
    "min_interval_ms": 10000,
    "capture": {
        "signals": ["Vehicle.Speed", "Vehicle.Chassis.Brake.PedalPosition",
                    "Vehicle.Chassis.Accelerator.PedalPosition"],
        "pre_ms": 2000, "post_ms": 2000, "sample_ms": 100,
    },
}

COMMON = {
    "Vehicle.Speed", "Vehicle.Powertrain.Transmission.SelectedGear",
    "Vehicle.Chassis.Accelerator.PedalPosition", "Vehicle.Chassis.Brake.PedalPosition",
    "Vehicle.Chassis.SteeringWheel.Angle", "Vehicle.TraveledDistance",
    "Vehicle.LowVoltageBattery.CurrentVoltage", "Vehicle.Cabin.Door.Row1.DriverSide.IsOpen",
    "Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen",
    "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked",
}
EV = {
    "Vehicle.Powertrain.ElectricMotor.Speed", "Vehicle.Powertrain.ElectricMotor.Torque",
    "Vehicle.Powertrain.TractionBattery.StateOfCharge.Displayed",
    "Vehicle.Powertrain.TractionBattery.CurrentVoltage",
    "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
    "Vehicle.Powertrain.TractionBattery.CellVoltage.Min",
    "Vehicle.Powertrain.TractionBattery.CellVoltage.Max",
    "Vehicle.Powertrain.TractionBattery.Module1.CellVoltage1",
    "Vehicle.Powertrain.TractionBattery.Module3.CellVoltage1",
    "Vehicle.Cabin.Door.Row2.DriverSide.IsOpen", "Vehicle.Cabin.Door.Row2.PassengerSide.IsOpen",
}
DIESEL = {
    "Vehicle.Powertrain.CombustionEngine.Speed", "Vehicle.Powertrain.CombustionEngine.ECT",
    "Vehicle.Powertrain.Transmission.CurrentGear", "Vehicle.Powertrain.FuelSystem.RelativeLevel",
    "Vehicle.Body.Trunk.Rear.IsOpen",
}
REQUIRED = {
    "ev_sedan": COMMON | EV,
    "diesel_van": COMMON | DIESEL,
    "busy_bus": COMMON | {"Vehicle.Powertrain.CombustionEngine.Speed",
                          "Vehicle.Powertrain.ElectricMotor.Speed"},
}
# Signals whose values go below zero in normal driving.
NEGATIVE = {
    "Vehicle.Chassis.SteeringWheel.Angle", "Vehicle.Powertrain.ElectricMotor.Torque",
    "Vehicle.Powertrain.ElectricMotor.Speed", "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
    "Vehicle.Powertrain.CombustionEngine.ECT", "Vehicle.Powertrain.Transmission.CurrentGear",
}


@pytest.fixture(scope="module")
def profiles() -> dict[str, LoadedProfile]:
    loaded = {}
    for path in PROFILE_FILES:
        profile = load_profile(path)
        loaded[profile.spec.vehicle.family] = profile
    return loaded


def load_dbc(path: Path) -> Database:
    db = Database(strict=True)
    db.add_dbc_file(str(path))  # as the loader does: cp1252, strict overlap checks
    return db


def frames_per_s(message: Message) -> float:
    return 1000 / message.cycle_time if message.cycle_time else 0.0


def signals_per_frame(message: Message) -> float:
    """Signals present in an average frame (a multiplexed frame carries one page)."""
    plain = [s for s in message.signals if not s.multiplexer_ids]
    pages = mux_pages(message)
    if pages == [None]:
        return float(len(plain))
    per_page = [sum(1 for s in message.signals if s.multiplexer_ids and p in s.multiplexer_ids)
                for p in pages]
    return len(plain) + sum(per_page) / len(per_page)


def frame_bits(message: Message) -> float:
    overhead = 67 if message.is_extended_frame else 47
    return (overhead + 8 * message.length) * STUFFING


def traffic(db: Database) -> tuple[float, float, float]:
    """Periodic frames/s, signals/s and bus load (fraction of 500 kbit/s)."""
    fps = sum(frames_per_s(m) for m in db.messages)
    sps = sum(frames_per_s(m) * signals_per_frame(m) for m in db.messages)
    load = sum(frames_per_s(m) * frame_bits(m) for m in db.messages) / BITRATE
    return fps, sps, load


def mux_pages(message: Message) -> list[int | None]:
    pages = sorted({p for s in message.signals for p in (s.multiplexer_ids or [])})
    return list(pages) if pages else [None]


def initial_value(signal: Signal) -> float:
    # GenSigStartValue is a raw value; its DBC default (when a signal has none) is raw 0.
    raw = signal.raw_initial if signal.raw_initial is not None else 0
    value = signal.conversion.raw_to_scaled(raw, decode_choices=False)
    assert isinstance(value, int | float)
    return float(value)


def frames_with_initial_values(message: Message) -> Iterator[tuple[int | None, dict[str, float]]]:
    selector = next((s for s in message.signals if s.is_multiplexer), None)
    for page in mux_pages(message):
        values = {s.name: initial_value(s) for s in message.signals
                  if not s.multiplexer_ids or page in s.multiplexer_ids}
        if selector is not None and page is not None:
            values[selector.name] = page
        yield page, values


def all_messages() -> Iterator[tuple[str, Message]]:
    for path in DBC_FILES:
        for message in load_dbc(path).messages:
            yield path.name, message


def catalog_messages(profile: LoadedProfile) -> dict[str, Message]:
    return {name: entry.message for name, entry in profile.catalog.items()}


# --- every profile loads and has the shape the rest of the project relies on -------------


def test_the_three_reference_profiles_are_shipped(profiles: dict[str, LoadedProfile]) -> None:
    assert set(profiles) == {"ev_sedan", "diesel_van", "busy_bus"}
    for family, profile in profiles.items():
        assert profile.path.stem == family
        assert profile.path.parent.name == family


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_loads_with_the_real_loader(path: Path) -> None:
    profile = load_profile(path)
    assert "OK" in profile.summary()
    assert profile.catalog, "empty catalog"
    assert profile.signals_used_by_rules() <= set(profile.catalog)
    assert all(profile.databases[b.name].messages for b in profile.spec.buses)


def test_every_shipped_dbc_is_used_by_a_profile(profiles: dict[str, LoadedProfile]) -> None:
    used = {
        (p.path.parent / name).resolve()
        for p in profiles.values() for bus in p.spec.buses for name in bus.databases
    }
    assert used == {path.resolve() for path in DBC_FILES}


@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_catalog_uses_the_canonical_names(family: str,
                                          profiles: dict[str, LoadedProfile]) -> None:
    catalog = profiles[family].catalog
    missing = REQUIRED[family] - set(catalog)
    assert not missing, f"{family} lacks {sorted(missing)}"
    for name in NEGATIVE & set(catalog):
        minimum = catalog[name].signal.minimum
        assert minimum is not None and minimum < 0, name
    odometer = catalog["Vehicle.TraveledDistance"]
    assert odometer.signal.unit == "km"
    assert odometer.signal.scale <= 0.1


@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_enumerations_use_the_agreed_value_names(family: str,
                                                 profiles: dict[str, LoadedProfile]) -> None:
    catalog = profiles[family].catalog

    def names(canonical: str) -> set[str]:
        choices = catalog[canonical].signal.choices
        return {str(v) for v in choices.values()} if choices else set()

    assert names("Vehicle.Powertrain.Transmission.SelectedGear") == {"P", "R", "N", "D"}
    doors = [n for n in catalog if n.endswith(".IsOpen")]
    assert len(doors) >= 3
    for door in doors:
        assert names(door) == {"Closed", "Open"}, door
    for lock in (n for n in catalog if n.endswith(".IsLocked")):
        assert names(lock) == {"UNLOCKED", "LOCKED"}, lock
    if "Vehicle.Powertrain.Transmission.CurrentGear" in catalog:
        gear = catalog["Vehicle.Powertrain.Transmission.CurrentGear"]
        assert not gear.signal.choices, "CurrentGear is an integer, not an enumeration"
        assert gear.signal.minimum == -1


@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_rules_of_every_type_and_the_shared_ones(family: str,
                                                 profiles: dict[str, LoadedProfile]) -> None:
    profile = profiles[family]
    rules = {r.name: r for r in profile.spec.rules}
    assert {r.type for r in profile.spec.rules} == {"periodic", "on_change", "trigger",
                                                     "aggregate"}
    assert any(isinstance(r, OnChangeRule) and r.deadband > 0 for r in rules.values())

    assert rules["hard_brake"].model_dump() == HARD_BRAKE
    assert isinstance(rules["hard_brake"], TriggerRule)

    speed = rules["speed_10hz"]
    assert isinstance(speed, PeriodicRule)
    assert (speed.period_ms, speed.signals) == (100, ["Vehicle.Speed"])

    status = rules["status_1hz"]
    assert isinstance(status, PeriodicRule) and status.period_ms == 1000
    assert {"Vehicle.TraveledDistance", "Vehicle.LowVoltageBattery.CurrentVoltage"} \
        <= set(status.signals)
    assert {"Vehicle.Powertrain.TractionBattery.StateOfCharge.Displayed",
            "Vehicle.Powertrain.FuelSystem.RelativeLevel"} & set(status.signals)

    doors = rules["doors_locks"]
    assert isinstance(doors, OnChangeRule)
    expected = {n for n in profile.catalog if n.endswith((".IsOpen", ".IsLocked"))
                and n.startswith("Vehicle.Cabin.Door")}
    assert expected | {"Vehicle.Powertrain.Transmission.SelectedGear"} <= set(doors.signals)

    stats = rules["speed_stats"]
    assert isinstance(stats, AggregateRule) and stats.window_ms == 10000
    assert {"min", "max", "mean", "count"} <= set(stats.functions)
    assert "Vehicle.Speed" in stats.signals
    if family == "ev_sedan":
        assert "Vehicle.Powertrain.TractionBattery.CurrentCurrent" in stats.signals


# --- the databases ---------------------------------------------------------------------


@pytest.mark.parametrize("path", DBC_FILES, ids=lambda p: p.name)
def test_messages_without_cycle_time_are_declared_event_driven(path: Path) -> None:
    for message in load_dbc(path).messages:
        if message.cycle_time is None:
            assert message.send_type not in (None, "Cyclic"), message.name
        else:
            assert message.cycle_time in (10, 20, 50, 100, 200, 500, 1000), message.name
        assert message.senders, f"{message.name} has no transmitting node"


@pytest.mark.parametrize("path", DBC_FILES, ids=lambda p: p.name)
def test_alive_counters_and_checksums_exist_and_wrap(path: Path) -> None:
    signals = [s for m in load_dbc(path).messages for s in m.signals]
    counters = [s for s in signals if s.name.endswith("_Counter")]
    crcs = [s for s in signals if s.name.endswith("_CRC")]
    assert len(counters) >= 3
    if path.name != "diesel_van.dbc":  # J1939 frames carry no E2E checksum
        assert len(crcs) >= 2
    for sig in counters + crcs:
        assert (sig.scale, sig.offset, sig.is_signed) == (1, 0, False), sig.name
        assert sig.maximum == 2 ** sig.length - 1, sig.name


def test_ev_databases_cover_the_decoder_features(profiles: dict[str, LoadedProfile]) -> None:
    ev = profiles["ev_sedan"]
    buses = {b.name: b for b in ev.spec.buses}
    assert buses["powertrain"].fd and buses["powertrain"].data_bitrate == 2_000_000
    assert buses["powertrain"].bitrate == 500_000 and buses["powertrain"].channel == "can0"
    assert not buses["body"].fd and buses["body"].bitrate == 125_000
    assert buses["body"].channel == "can1"
    messages = [m for db in ev.databases.values() for m in db.messages]
    signals = [s for m in messages for s in m.signals]

    assert any(m.is_multiplexed() for m in messages)
    assert any(m.is_fd and m.length == 32 for m in ev.databases["powertrain"].messages)
    assert any(m.is_extended_frame for m in messages)
    assert any(s.byte_order == "big_endian" for s in signals)
    assert any(s.byte_order == "little_endian" for s in signals)
    assert any(s.is_signed for s in signals)
    assert any(s.offset != 0 and s.scale != 1 for s in signals)
    assert any(s.choices for s in signals)
    assert all(s.minimum is not None and s.maximum is not None for s in signals)
    body = [s for m in ev.databases["body"].messages for s in m.signals if s.length > 1]
    assert body and all(s.byte_order == "big_endian" for s in body)

    page1 = ev.catalog["Vehicle.Powertrain.TractionBattery.Module1.CellVoltage1"]
    page3 = ev.catalog["Vehicle.Powertrain.TractionBattery.Module3.CellVoltage1"]
    assert page1.message is page3.message and page1.message.is_fd
    assert page1.signal.multiplexer_ids and page3.signal.multiplexer_ids
    assert set(page1.signal.multiplexer_ids).isdisjoint(page3.signal.multiplexer_ids)
    assert len(mux_pages(page1.message)) == 4


def test_diesel_van_mixes_j1939_and_proprietary_frames(profiles: dict[str, LoadedProfile]) -> None:
    van = profiles["diesel_van"]
    (bus,) = van.spec.buses
    assert (bus.name, bus.channel, bus.bitrate, bus.fd) == ("powertrain", "can0", 500_000, False)
    catalog = van.catalog
    for name in ("Vehicle.Powertrain.CombustionEngine.Speed",
                 "Vehicle.Powertrain.CombustionEngine.ECT",
                 "Vehicle.Powertrain.FuelSystem.RelativeLevel"):
        assert catalog[name].message.is_extended_frame, name
        assert catalog[name].message.protocol == "j1939", name
    assert not catalog["Vehicle.Cabin.Door.Row1.DriverSide.IsOpen"].message.is_extended_frame


@pytest.mark.parametrize(("dbc", "message"), list(all_messages()),
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_every_message_round_trips_its_initial_values(dbc: str, message: Message) -> None:
    for page, values in frames_with_initial_values(message):
        data = message.encode(values, scaling=True, strict=True)
        assert len(data) == message.length
        decoded = message.decode_simple(data, decode_choices=False, scaling=True)
        assert set(decoded) == set(values), f"page {page}"
        for name, value in values.items():
            signal = message.get_signal_by_name(name)
            got = decoded[name]
            assert isinstance(got, int | float)
            assert math.isclose(got, value, abs_tol=signal.scale / 2), \
                f"{dbc} {message.name}.{name} (page {page})"
        named = message.decode_simple(data, decode_choices=True)
        for name, named_value in named.items():
            choices = message.get_signal_by_name(name).choices
            if choices and int(values[name]) in choices:
                assert str(named_value) == str(choices[int(values[name])])


# --- the busy-bus benchmark database ----------------------------------------------------


@pytest.fixture(scope="module")
def busy(profiles: dict[str, LoadedProfile]) -> LoadedProfile:
    return profiles["busy_bus"]


def test_busy_bus_traffic_matches_a_real_powertrain_bus(busy: LoadedProfile) -> None:
    db = busy.databases["powertrain"]
    fps, sps, load = traffic(db)
    assert 3700 * 0.9 <= fps <= 3700 * 1.1, fps
    assert 10000 * 0.9 <= sps <= 10000 * 1.1, sps
    assert load < 0.80, load
    cycles = {m.cycle_time for m in db.messages}
    assert {10, 20, 50, 100, 200, 1000} <= cycles
    fast = sum(frames_per_s(m) for m in db.messages if m.cycle_time in (10, 20))
    assert fast > fps / 2, "most frames should be 10/20 ms traffic"
    assert len({m.length for m in db.messages if m.cycle_time}) >= 4, "DLCs should vary"
    assert sum(1 for m in db.messages if m.cycle_time is None) >= 100
    assert any(m.is_extended_frame for m in db.messages)


def test_busy_bus_rules_need_a_small_fraction_of_the_frames(busy: LoadedProfile) -> None:
    db = busy.databases["powertrain"]
    needed = busy.messages_used()["powertrain"]
    total = sum(frames_per_s(m) for m in db.messages)
    used = sum(frames_per_s(m) for m in db.messages if (m.frame_id, m.is_extended_frame) in needed)
    assert 0 < used / total < 0.2
    assert 25 <= len(busy.catalog) <= 40
    assert 10 <= len({e.message.name for e in busy.catalog.values()}) <= 16


def test_busy_bus_is_the_largest_shipped_database() -> None:
    busy_path = PROFILES_DIR / "busy_bus" / "busy_bus.dbc"
    sizes = {p: len(load_dbc(p).messages) for p in DBC_FILES}
    assert max(sizes, key=lambda p: sizes[p]) == busy_path
    assert sizes[busy_path] >= 300
    assert max(DBC_FILES, key=lambda p: p.stat().st_size) == busy_path


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_busy_bus_dbc", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_busy_bus_dbc_is_what_the_generator_writes(tmp_path: Path) -> None:
    generator: Any = _generator()
    committed = (PROFILES_DIR / "busy_bus" / "busy_bus.dbc").read_text()
    assert generator.render() == committed, "stale: run scripts/gen_busy_bus_dbc.py"
    assert generator.main(["--check"]) == 0
    out = tmp_path / "bus.dbc"
    out.write_text("outdated")
    assert generator.main(["--check", str(out)]) == 1
    assert generator.main([str(out)]) == 0
    assert out.read_text() == committed


def test_busy_bus_generator_totals_agree_with_the_database(busy: LoadedProfile) -> None:
    generator: Any = _generator()
    totals = generator.totals(generator.all_messages())
    fps, sps, load = traffic(busy.databases["powertrain"])
    assert totals["frames_per_s"] == pytest.approx(fps)
    assert totals["signals_per_s"] == pytest.approx(sps)
    assert totals["bus_load"] == pytest.approx(load)
    assert totals["messages"] == len(busy.databases["powertrain"].messages)
