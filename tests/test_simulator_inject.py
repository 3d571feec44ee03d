"""Fault injection: error frames, unknown ids and wrong lengths reach the bus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import can
import pytest

from agent.profile.loader import LoadedProfile, load_profile
from simulator.inject import FaultConfig, FaultInjector, parse_kinds, unknown_ids, wrong_length
from simulator.load import LoadRunner
from simulator.testing import run_simulator, virtual_buses

SIM_PROFILE = Path(__file__).resolve().parent / "data" / "sim" / "sim_ev.yaml"


@pytest.fixture(scope="module")
def profile() -> LoadedProfile:
    return load_profile(SIM_PROFILE)


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


def classify(profile: LoadedProfile, bus: str, frames: list[can.Message]) -> dict[str, int]:
    db = profile.databases[bus]
    known = {m.frame_id: m for p in profile.databases.values() for m in p.messages}
    kinds = {"error": 0, "unknown": 0, "unknown-extended": 0, "wrong-length": 0, "good": 0}
    for frame in frames:
        if frame.is_error_frame:
            kinds["error"] += 1
        elif frame.arbitration_id not in known:
            kinds["unknown-extended" if frame.is_extended_id else "unknown"] += 1
        elif len(frame.data) != db.get_message_by_frame_id(frame.arbitration_id).length:
            kinds["wrong-length"] += 1
        else:
            kinds["good"] += 1
    return kinds


def test_faults_arrive_alongside_the_drive_cycle(profile: LoadedProfile, receivers: Receivers) -> None:
    buses, rx = receivers
    with run_simulator(profile, buses=buses, time_scale=10, inject="all", inject_rate=200) as sim:
        injector = sim.injector
        assert injector is not None
        # Two full rounds: every kind on every bus at least twice.
        assert sim.wait_for(lambda: sum(injector.counts.values()) >= 12, timeout=30)
    for bus in ("powertrain", "body"):
        kinds = classify(profile, bus, drain(rx[bus]))
        assert kinds["error"] >= 2 and kinds["wrong-length"] >= 2, kinds
        assert kinds["unknown"] >= 1 and kinds["unknown-extended"] >= 1, kinds
        assert kinds["good"] > 0  # the ECUs keep sending
    assert set(injector.counts) == {"error-frames", "unknown-ids", "wrong-length"}


def test_only_the_chosen_kinds_on_the_chosen_bus(profile: LoadedProfile, receivers: Receivers) -> None:
    buses, rx = receivers
    config = FaultConfig(kinds=("error-frames",), rate_hz=200, buses=("body",))
    with run_simulator(profile, buses=buses, time_scale=10, inject=config) as sim:
        injector = sim.injector
        assert injector is not None
        assert sim.wait_for(lambda: injector.counts["error-frames"] >= 3, timeout=30)
    body = classify(profile, "body", drain(rx["body"]))
    powertrain = classify(profile, "powertrain", drain(rx["powertrain"]))
    assert body["error"] >= 3 and body["unknown"] == body["wrong-length"] == 0
    assert powertrain["error"] == powertrain["unknown"] == powertrain["wrong-length"] == 0


def test_faults_alongside_load_mode(profile: LoadedProfile, receivers: Receivers) -> None:
    buses, rx = receivers
    runner = LoadRunner(profile, 10.0, buses={"body": buses["body"]}, only=["body"],
                        inject=FaultConfig(kinds=("unknown-ids", "wrong-length"), rate_hz=200))
    with runner:
        injector = runner.injector
        assert injector is not None
        assert runner.wait_for(lambda: sum(injector.counts.values()) >= 4, timeout=30)
    kinds = classify(profile, "body", drain(rx["body"]))
    assert kinds["unknown"] + kinds["unknown-extended"] >= 2 and kinds["wrong-length"] >= 2
    assert kinds["good"] > 0 and kinds["error"] == 0


def test_error_frames_carry_a_socketcan_error_class(profile: LoadedProfile) -> None:
    injector = FaultInjector(profile, FaultConfig(), ["powertrain"])
    frames = [injector.make("error-frames", "powertrain", n) for n in range(2)]
    assert all(f is not None and f.is_error_frame and f.dlc == 8 for f in frames)
    assert {f.arbitration_id for f in frames if f is not None} == {0x004, 0x008}


def test_unknown_ids_are_in_no_database(profile: LoadedProfile) -> None:
    standard, extended = unknown_ids(profile)
    known = {m.frame_id for db in profile.databases.values() for m in db.messages}
    assert len(standard) == len(extended) == 4
    assert not (set(standard) | set(extended)) & known
    assert all(i < 0x700 for i in standard) and all(i > 0x7FF for i in extended)


@pytest.mark.parametrize(("expected", "fd", "longer", "result"), [
    (8, False, False, 7), (8, False, True, 7), (4, False, True, 5), (0, False, False, 1),
    (16, True, False, 12), (16, True, True, 20), (64, True, True, 48), (8, True, True, 12),
])
def test_wrong_length_is_a_valid_other_length(expected: int, fd: bool, longer: bool,
                                              result: int) -> None:
    assert wrong_length(expected, fd, longer) == result


def test_fault_kinds_are_checked() -> None:
    assert parse_kinds("all") == ("error-frames", "unknown-ids", "wrong-length")
    assert parse_kinds(" unknown-ids , error-frames") == ("unknown-ids", "error-frames")
    with pytest.raises(ValueError, match="bogus"):
        parse_kinds("error-frames,bogus")
    with pytest.raises(ValueError):
        FaultConfig(rate_hz=0)
