"""The pipeline over real python-can virtual buses: counting, filtering, reopening."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import can
import pytest

from agent.config import BusOverride, CanSettings, ClockSettings
from agent.pipeline import Pipeline, PipelineSettings
from agent.profile.loader import load_profile
from agent.records import Event, Sample
from agent.sinks import MemorySink
from tests import flaky_bus

UNIT = Path(__file__).parent / "data" / "unit" / "unit.yaml"


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def unit_profile():  # type: ignore[no-untyped-def]
    return load_profile(UNIT)


def start(profile, channel: str, interface: str = "virtual"):  # type: ignore[no-untyped-def]
    sink = MemorySink()
    settings = PipelineSettings(CanSettings(reopen_initial_s=0.05, reopen_max_s=0.2),
                                ClockSettings(synced="assume_synced"))
    pipeline = Pipeline(profile, sink, {"main": BusOverride(interface=interface, channel=channel)}, settings)
    import threading

    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    assert pipeline.wait_ready(5)
    return pipeline, sink, thread


def test_bad_frames_are_counted_and_never_stop_the_pipeline(unit_profile) -> None:  # type: ignore[no-untyped-def]
    pipeline, sink, thread = start(unit_profile, "pipe-bad")
    dyn = unit_profile.databases["main"].get_message_by_name("Dynamics")
    tx = can.Bus(interface="virtual", channel="pipe-bad")
    try:
        good = dyn.encode({"Speed": 42.0, "Brake": 0, "Steering": 0, "Gear": 3, "Dyn_Counter": 0, "Temp": 20})
        tx.send(can.Message(arbitration_id=dyn.frame_id, data=good, is_extended_id=False))
        tx.send(can.Message(arbitration_id=dyn.frame_id, data=good[:5], is_extended_id=False))
        tx.send(can.Message(is_error_frame=True, arbitration_id=0x20000004, data=b"\0" * 8))
        tx.send(can.Message(arbitration_id=0x7AB, data=b"\x01", is_extended_id=False))  # not in the DBC
        cells = unit_profile.databases["main"].get_message_by_name("Cells")
        tx.send(can.Message(arbitration_id=cells.frame_id, data=b"\x0f" + b"\0" * 7, is_extended_id=False))
        time.sleep(0.3)  # a later period of the 100 ms periodic rule
        good2 = dyn.encode({"Speed": 43.0, "Brake": 0, "Steering": 0, "Gear": 3, "Dyn_Counter": 1, "Temp": 20})
        tx.send(can.Message(arbitration_id=dyn.frame_id, data=good2, is_extended_id=False))
        stats = pipeline.readers[0].processor.stats
        assert wait_for(lambda: stats.frames >= 6)
        assert wait_for(lambda: any(isinstance(r, Sample) and r.value == 43.0 for r in sink.records))
    finally:
        tx.shutdown()
        pipeline.stop()
        thread.join(10)
    assert (stats.wrong_length, stats.error_frames, stats.decode_errors) == (1, 1, 1)
    assert stats.frames == 6 and stats.unknown_id == 1
    speeds = [r.value for r in sink.records if isinstance(r, Sample) and r.signal == "Vehicle.Speed"]
    assert speeds == [42.0, 43.0]


def test_bus_that_fails_is_reopened(unit_profile) -> None:  # type: ignore[no-untyped-def]
    pipeline, sink, thread = start(unit_profile, "pipe-flaky", interface="flaky")
    dyn = unit_profile.databases["main"].get_message_by_name("Dynamics")
    tx = can.Bus(interface="virtual", channel="pipe-flaky")
    stats = pipeline.readers[0].processor.stats
    try:
        opened = len(flaky_bus.OPENED)
        flaky_bus.FAIL_NEXT_RECV.set()
        assert wait_for(lambda: stats.bus_errors == 1 and len(flaky_bus.OPENED) > opened)
        assert pipeline.wait_ready(5)
        data = dyn.encode({"Speed": 77.0, "Brake": 0, "Steering": 0, "Gear": 3, "Dyn_Counter": 0, "Temp": 20})
        tx.send(can.Message(arbitration_id=dyn.frame_id, data=data, is_extended_id=False))
        assert wait_for(lambda: any(isinstance(r, Sample) and r.value == 77.0 for r in sink.records))
    finally:
        tx.shutdown()
        pipeline.stop()
        thread.join(10)


def test_bus_that_cannot_open_is_retried_with_backoff(unit_profile) -> None:  # type: ignore[no-untyped-def]
    sink = MemorySink()
    settings = PipelineSettings(CanSettings(reopen_initial_s=0.05, reopen_max_s=0.1), ClockSettings())
    pipeline = Pipeline(unit_profile, sink, {"main": BusOverride(interface="socketcan", channel="nosuchcan9")},
                        settings)
    pipeline.run(duration=1.0)
    stats = pipeline.readers[0].processor.stats
    assert stats.reopens >= 3
    assert stats.frames == 0


def test_trigger_event_from_frames(unit_profile) -> None:  # type: ignore[no-untyped-def]
    pipeline, sink, thread = start(unit_profile, "pipe-trigger")
    dyn = unit_profile.databases["main"].get_message_by_name("Dynamics")
    tx = can.Bus(interface="virtual", channel="pipe-trigger")
    try:
        for i, brake in enumerate([0, 0, 0, 90, 90, 90, 0, 0]):
            data = dyn.encode({"Speed": 80 - i, "Brake": brake, "Steering": 0, "Gear": 3,
                               "Dyn_Counter": i % 16, "Temp": 20})
            tx.send(can.Message(arbitration_id=dyn.frame_id, data=data, is_extended_id=False))
            time.sleep(0.1)
        assert wait_for(lambda: any(isinstance(r, Event) for r in sink.records), timeout=5)
    finally:
        tx.shutdown()
        pipeline.stop()
        thread.join(10)
    events = [r for r in sink.records if isinstance(r, Event)]
    assert len(events) == 1 and events[0].rule == "hard_brake"
    brake = [s.value for s in events[0].samples if s.signal == "Vehicle.Chassis.Brake.PedalPosition"]
    assert 0 in brake and 90 in brake
