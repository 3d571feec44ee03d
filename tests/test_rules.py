"""Every rule type, driven with explicit monotonic times (no sleeping, no timing asserts)."""

from __future__ import annotations

from typing import Any

import pytest

from agent import expr
from agent.clock import Clock
from agent.profile.model import AggregateRule, OnChangeRule, PeriodicRule, TriggerRule
from agent.records import Aggregate, Event, Sample
from agent.rules import RuleEngine

SPEED, BRAKE, GEAR = "Vehicle.Speed", "Vehicle.Chassis.Brake.PedalPosition", "Gear"


class FakeTime:
    """Monotonic and wall clocks under test control; the wall clock can jump."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall_offset_ns = 1_700_000_000 * 10**9

    def monotonic(self) -> float:
        return self.mono

    def wall_ns(self) -> int:
        return int(self.mono * 1e9) + self.wall_offset_ns


def engine(*rules: Any, synced: bool = True) -> tuple[RuleEngine, FakeTime, Clock]:
    t = FakeTime()
    clock = Clock(monotonic=t.monotonic, wall_ns=t.wall_ns, synced=lambda: synced)
    conditions = {r.name: expr.parse(r.condition) for r in rules if isinstance(r, TriggerRule)}
    return RuleEngine(list(rules), conditions, clock), t, clock


def run(eng: RuleEngine, t: FakeTime, until: float, step: float = 0.01,
        feed: Any = None) -> list[Any]:
    """Advance time in steps, feeding values from ``feed(t)``, ticking at every step."""
    out = []
    while t.mono < until - 1e-9:
        t.mono = round(t.mono + step, 6)
        if feed is not None:
            values = feed(t.mono)
            if values:
                eng.update(t.mono, values)
        eng.tick(t.mono)
        out += eng.drain()
    return out


def periodic(period_ms: int = 100, signals: list[str] | None = None) -> PeriodicRule:
    return PeriodicRule(type="periodic", name="p", period_ms=period_ms, signals=signals or [SPEED])


def test_periodic_emits_latest_value_each_period_with_receipt_time() -> None:
    eng, t, clock = engine(periodic(100))
    out = run(eng, t, 101.0, feed=lambda now: [(SPEED, round(now - 100, 2))])
    assert len(out) == 10
    assert all(isinstance(s, Sample) and s.rule == "p" for s in out)
    # the value emitted is the one received at the tick, stamped with its receipt time
    for s in out:
        assert s.ts_ns == clock.wall_ns(100 + s.value)  # type: ignore[operator]


def test_periodic_does_not_repeat_a_reading_when_no_new_frame_arrived() -> None:
    eng, t, _ = engine(periodic(100))
    out = run(eng, t, 101.0, feed=lambda now: [(SPEED, 1.0)] if abs(now - 100.25) < 1e-6 else None)
    assert [s.value for s in out] == [1.0]


def test_periodic_counts_repeated_frames_as_new_readings() -> None:
    eng, t, _ = engine(periodic(100))
    eng.update(100.0, [(SPEED, 5.0)])
    out = []
    for i in range(1, 6):
        t.mono = 100 + i * 0.1
        eng.repeat(t.mono, [SPEED])  # byte-identical frame: same value, fresh reading
        eng.tick(t.mono)
        out += eng.drain()
    assert [s.value for s in out] == [5.0] * 5


def test_on_change_with_deadband_reports_relative_to_last_emitted() -> None:
    rule = OnChangeRule(type="on_change", name="c", signals=[SPEED], deadband=1.0)
    eng, _t, _ = engine(rule)
    for i, v in enumerate([10.0, 10.5, 10.9, 11.2, 11.0, 9.9, 9.95]):
        eng.update(100 + i, [(SPEED, v)])
    assert [s.value for s in eng.drain()] == [10.0, 11.2, 9.9]


def test_on_change_enumeration_and_min_interval_keeps_final_state() -> None:
    rule = OnChangeRule(type="on_change", name="c", signals=[GEAR], min_interval_ms=1000)
    eng, t, _ = engine(rule)
    seq = {100.1: "P", 100.2: "R", 100.3: "N", 100.4: "D"}
    out = run(eng, t, 103.0, feed=lambda now: [(GEAR, seq[round(now, 2)])] if round(now, 2) in seq else None)
    # P at once; R and N superseded inside the interval; D emitted when the interval ends
    assert [s.value for s in out] == ["P", "D"]


def hard_brake(min_interval_ms: int = 10_000, mode: str = "rising_edge") -> TriggerRule:
    return TriggerRule.model_validate({
        "type": "trigger", "name": "hard_brake", "mode": mode, "min_interval_ms": min_interval_ms,
        "condition": f"{BRAKE} > 80 and {SPEED} > 50",
        "capture": {"signals": [SPEED, BRAKE], "pre_ms": 1000, "post_ms": 500, "sample_ms": 100},
    })


def brake_profile(brake_at: list[tuple[float, float]]) -> Any:
    def feed(now: float) -> list[tuple[str, float]]:
        brake = 0.0
        for start, end in brake_at:
            if start <= now < end:
                brake = 95.0
        return [(SPEED, 80.0 - (now - 100)), (BRAKE, brake)]
    return feed


def test_trigger_captures_pre_and_post_window_once() -> None:
    eng, t, clock = engine(hard_brake())
    out = run(eng, t, 105.0, feed=brake_profile([(102.0, 103.0)]))
    events = [r for r in out if isinstance(r, Event)]
    assert len(events) == 1
    ev = events[0]
    assert ev.trigger_ts_ns == clock.wall_ns(102.0)
    times = sorted({s.ts_ns for s in ev.samples})
    # 10 samples before (1 s at 100 ms), the trigger instant, 5 after (0.5 s)
    assert len(times) == 16
    assert times[0] == pytest.approx(clock.wall_ns(101.0), abs=1000)
    assert times[-1] == pytest.approx(clock.wall_ns(102.5), abs=1000)
    brake_values = [s.value for s in ev.samples if s.signal == BRAKE]
    assert brake_values[:10] == [0.0] * 10 and brake_values[10:] == [95.0] * 6


def test_trigger_inside_min_interval_is_suppressed_and_counted() -> None:
    eng, t, _ = engine(hard_brake(min_interval_ms=10_000))
    out = run(eng, t, 106.0, feed=brake_profile([(101.0, 101.5), (103.0, 103.5)]))
    assert len([r for r in out if isinstance(r, Event)]) == 1
    assert eng.stats.triggers_fired == 1 and eng.stats.triggers_suppressed == 1


def test_trigger_fires_again_after_min_interval() -> None:
    eng, t, _ = engine(hard_brake(min_interval_ms=1000))
    out = run(eng, t, 106.0, feed=brake_profile([(101.0, 101.5), (103.0, 103.5)]))
    assert len([r for r in out if isinstance(r, Event)]) == 2


def test_trigger_mode_always_fires_on_every_true_evaluation() -> None:
    eng, t, _ = engine(hard_brake(min_interval_ms=0, mode="always"))
    run(eng, t, 100.5, feed=brake_profile([(100.0, 101.0)]))
    assert eng.stats.triggers_fired == 50  # every 10 ms step changes speed -> re-evaluated


def test_trigger_never_fires_on_missing_signal() -> None:
    eng, t, _ = engine(hard_brake())
    run(eng, t, 101.0, feed=lambda now: [(BRAKE, 99.0)])
    assert eng.stats.triggers_fired == 0


def test_aggregate_windows() -> None:
    rule = AggregateRule(type="aggregate", name="a", window_ms=1000, signals=[SPEED, GEAR],
                         functions=["min", "max", "mean", "count", "last"])
    eng, _t, clock = engine(rule)
    values = iter([1.0, 5.0, 3.0])
    for i in range(3):
        eng.update(100.1 + i * 0.1, [(SPEED, next(values))])
    eng.repeat(100.5, [SPEED])  # identical frame: counted with the value it repeats
    eng.update(100.6, [(GEAR, "D")])
    eng.tick(101.0)
    out = {r.signal: r for r in eng.drain() if isinstance(r, Aggregate)}
    assert out[SPEED].values == {"min": 1.0, "max": 5.0, "mean": 3.0, "count": 4, "last": 3.0}
    assert out[GEAR].values == {"count": 1, "last": "D"}
    assert (out[SPEED].start_ns, out[SPEED].end_ns) == (clock.wall_ns(100.0), clock.wall_ns(101.0))
    eng.tick(102.0)
    assert eng.drain() == []  # empty window: nothing


def test_wall_clock_jumps_do_not_reorder_drop_or_duplicate() -> None:
    eng, t, clock = engine(periodic(100))
    out = run(eng, t, 101.0, feed=lambda now: [(SPEED, now)])
    t.wall_offset_ns -= 3600 * 10**9  # wall clock stepped back an hour
    step = clock.check()
    assert step is not None and step.step_ns == -3600 * 10**9
    out += run(eng, t, 102.0, feed=lambda now: [(SPEED, now)])
    t.wall_offset_ns += 7200 * 10**9  # and forward two hours
    clock.check()
    out += run(eng, t, 103.0, feed=lambda now: [(SPEED, now)])
    # exactly one sample per period, in emission (monotonic) order, none lost
    assert len(out) == 30
    assert [s.value for s in out] == sorted(s.value for s in out)
    # timestamps follow the corrected wall clock after each step
    assert out[10].ts_ns - out[9].ts_ns == pytest.approx(-3600e9 + 0.1e9, abs=1e6)
    assert out[20].ts_ns - out[19].ts_ns == pytest.approx(7200e9 + 0.1e9, abs=1e6)


def test_scheduler_is_monotonic_so_a_stall_emits_once_not_a_burst() -> None:
    eng, t, _ = engine(periodic(100))
    eng.update(100.05, [(SPEED, 1.0)])
    t.mono = 130.0  # the process was stopped for 30 s
    eng.tick(t.mono)
    assert len(eng.drain()) == 1
    assert eng.next_deadline() > t.mono


def test_clock_synced_flag_is_carried() -> None:
    eng, t, _ = engine(periodic(100), synced=False)
    out = run(eng, t, 100.5, feed=lambda now: [(SPEED, 1.0 + now)])
    assert out and not any(s.clock_synced for s in out)


def test_flush_closes_open_capture_and_window() -> None:
    rule = AggregateRule(type="aggregate", name="a", window_ms=10_000, signals=[SPEED], functions=["count"])
    eng, t, _ = engine(hard_brake(), rule)
    run(eng, t, 102.02, feed=brake_profile([(102.0, 103.0)]))
    eng.drain()
    eng.flush(102.05)
    kinds = sorted(type(r).__name__ for r in eng.drain())
    assert kinds == ["Aggregate", "Event"]
