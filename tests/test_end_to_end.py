"""The simulator drives the full drive cycle through the agent on virtual buses."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.config import BusOverride, CanSettings, ClockSettings
from agent.pipeline import Pipeline, PipelineSettings
from agent.profile.loader import load_profile
from agent.records import Aggregate, Event, Sample
from agent.sinks import MemorySink
from simulator.testing import run_simulator, virtual_buses

ROOT = Path(__file__).parent.parent
SPEED, BRAKE = "Vehicle.Speed", "Vehicle.Chassis.Brake.PedalPosition"
TIME_SCALE = 2.0


@pytest.mark.parametrize("profile_name", ["ev_sedan", "diesel_van"])
def test_drive_cycle_end_to_end(profile_name: str) -> None:
    path = ROOT / "firmware_profiles" / profile_name / f"{profile_name}.yaml"
    profile = load_profile(path)
    buses = virtual_buses(profile)
    sink = MemorySink()
    pipeline = Pipeline(profile, sink, {n: BusOverride(interface=i, channel=c) for n, (i, c) in buses.items()},
                        PipelineSettings(CanSettings(), ClockSettings(synced="assume_synced")))
    agent = threading.Thread(target=pipeline.run, daemon=True)
    agent.start()
    assert pipeline.wait_ready(5)
    with run_simulator(profile, buses=buses, time_scale=TIME_SCALE) as sim:
        cycle = sim.cycle
        assert sim.wait_finished(timeout=cycle.duration / TIME_SCALE + 30)
        # let the post-trigger window (2 s) and the last periodic ticks complete
        threading.Event().wait(2.5)
    pipeline.stop()
    agent.join(10)
    stats = pipeline.stats()["buses"]
    assert all(b["decode_errors"] == 0 and b["wrong_length"] == 0 for b in stats.values()), stats  # type: ignore[attr-defined]

    speeds = [r for r in sink.records if isinstance(r, Sample) and r.rule == "speed_10hz"]
    # 10 Hz while frames flowed: the whole cycle (simulated time runs TIME_SCALE times faster
    # than the wall clock) and the 2.5 s the simulator kept the vehicle parked afterwards
    expected = (cycle.duration / TIME_SCALE + 2.5) * 10
    assert 0.8 * expected <= len(speeds) <= 1.1 * expected
    assert [s.ts_ns for s in speeds] == sorted(s.ts_ns for s in speeds)
    mismatches = []
    for s in speeds:
        t = sim.scenario_time(s.ts_ns / 1e9)
        # the frame was encoded at most a few cycle times before it was received
        window = [cycle.state_at(max(0.0, t - dt))[SPEED] for dt in (0, 0.05, 0.1, 0.15, 0.2)]
        if not min(window) - 0.6 <= s.value <= max(window) + 0.6:  # type: ignore[operator]
            mismatches.append((round(t, 2), s.value, window))
    assert len(mismatches) <= len(speeds) * 0.02, mismatches[:10]
    assert max(s.value for s in speeds) >= 85  # type: ignore[type-var]

    events = [r for r in sink.records if isinstance(r, Event) and r.rule == "hard_brake"]
    assert len(events) == 1, [e.trigger_ts_ns for e in events]
    event = events[0]
    trigger_t = sim.scenario_time(event.trigger_ts_ns / 1e9)
    assert cycle.hard_brake_time - 0.5 <= trigger_t <= cycle.hard_brake_time + 1.0
    times = sorted({s.ts_ns for s in event.samples})
    # pre 2 s and post 2 s of wall time, sampled every 100 ms
    assert (event.trigger_ts_ns - times[0]) / 1e9 == pytest.approx(2.0, abs=0.15)
    assert (times[-1] - event.trigger_ts_ns) / 1e9 == pytest.approx(2.0, abs=0.15)
    assert 38 <= len(times) <= 42
    brake = [s.value for s in event.samples if s.signal == BRAKE]
    assert min(brake) < 20 and max(brake) > 80  # type: ignore[type-var,operator]

    stats_records = [r for r in sink.records if isinstance(r, Aggregate) and r.rule == "speed_stats"]
    assert stats_records and all(r.values["min"] <= r.values["mean"] <= r.values["max"]  # type: ignore[operator]
                                 for r in stats_records if r.signal == SPEED)
    doors = [r.value for r in sink.records if isinstance(r, Sample)
             and r.signal == "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"]
    assert doors[0] == "LOCKED" and "UNLOCKED" in doors and doors[-1] == "LOCKED"
