"""The drive-cycle scenario: physics, the event sequence, and agreement with the databases."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.profile.loader import load_profile
from simulator import scenario as sc
from simulator.scenario import DriveCycle, ScenarioConfig

ROOT = Path(__file__).resolve().parent.parent
SIM_PROFILE = ROOT / "tests" / "data" / "sim" / "sim_ev.yaml"
SHIPPED = sorted((ROOT / "firmware_profiles").glob("*/*.yaml"))
POWERTRAINS = ("electric", "combustion", "hybrid")
HYBRID = DriveCycle(ScenarioConfig(powertrain="hybrid"))


@pytest.fixture(scope="module", params=POWERTRAINS)
def cycle(request: pytest.FixtureRequest) -> DriveCycle:
    return DriveCycle(ScenarioConfig(powertrain=request.param))


_SAMPLES: dict[tuple[int, float], list[tuple[float, dict[str, sc.Value]]]] = {}


def samples(cycle: DriveCycle, step: float = 0.01) -> list[tuple[float, dict[str, sc.Value]]]:
    """The whole cycle sampled every ``step`` seconds (cached: tests only read it)."""
    key = (id(cycle), step)
    if key not in _SAMPLES:
        n = int(cycle.duration / step)
        _SAMPLES[key] = [(k * step, cycle.state_at(k * step)) for k in range(n + 1)]
    return _SAMPLES[key]


def num(state: dict[str, sc.Value], name: str) -> float:
    value = state[name]
    assert isinstance(value, int | float)
    return float(value)


def test_phases_are_contiguous_and_in_drive_order(cycle: DriveCycle) -> None:
    assert 40.0 <= cycle.duration <= 60.0
    names = [p.name for p in cycle.phases]
    assert names == ["parked", "unlock", "enter_door_open", "enter_door_closed", "start",
                     "accelerate", "cruise", "hard_brake", "stop", "shift_park",
                     "exit_door_open", "exit_door_closed", "lock", "parked_end"]
    for before, after in zip(cycle.phases, cycle.phases[1:], strict=False):
        assert before.end == pytest.approx(after.start)
    assert cycle.boundaries()[-1] == cycle.duration
    assert cycle.phase_at(cycle.hard_brake_time).name == "hard_brake"


def test_odometer_is_the_integral_of_speed(cycle: DriveCycle) -> None:
    # A step that does not divide the model's step, so boundaries fall inside samples.
    points = samples(cycle, step=0.0093)
    integral_km = 0.0
    for (t0, s0), (t1, s1) in itertools.pairwise(points):
        integral_km += (num(s0, sc.SPEED) + num(s1, sc.SPEED)) / 2 * (t1 - t0) / 3600.0
    travelled = num(points[-1][1], sc.TRAVELED_DISTANCE) - num(points[0][1], sc.TRAVELED_DISTANCE)
    assert travelled > 0.3  # ~90 km/h for a good part of a minute
    assert travelled == pytest.approx(integral_km, abs=1e-5)  # within 1 cm


def test_speed_is_the_integral_of_acceleration(cycle: DriveCycle) -> None:
    step = cycle.config.step
    for k in range(0, int(cycle.duration / step) - 1, 7):
        # Inside one model step the acceleration is constant.
        t0, t1 = (k + 0.25) * step, (k + 0.75) * step
        before, after = cycle.state_at(t0), cycle.state_at(t1)
        dv_kmh = num(after, sc.SPEED) - num(before, sc.SPEED)
        assert dv_kmh == pytest.approx(num(before, sc.ACCELERATION) * (t1 - t0) * 3.6, abs=1e-9)


def test_hard_brake_happens_exactly_once_at_the_exposed_time(cycle: DriveCycle) -> None:
    edges = []
    previous = False
    for t, state in samples(cycle):
        hard = num(state, sc.BRAKE) > sc.HARD_BRAKE_PEDAL and num(state, sc.SPEED) > 50.0
        if hard and not previous:
            edges.append(t)
        previous = hard
    assert len(edges) == 1
    assert edges[0] == pytest.approx(cycle.hard_brake_time, abs=0.011)
    at_brake = cycle.state_at(cycle.hard_brake_time + 1e-6)
    assert num(at_brake, sc.SPEED) > 80.0
    assert num(cycle.state_at(cycle.hard_brake_time - 1e-6), sc.BRAKE) <= sc.HARD_BRAKE_PEDAL
    # The brake pedal is above 80 % only in the hard-brake phase.
    for t, state in samples(cycle, 0.01):
        if num(state, sc.BRAKE) > sc.HARD_BRAKE_PEDAL:
            assert cycle.phase_at(t).name in ("hard_brake", "stop")


def test_parked_in_p_at_both_ends_and_p_only_at_standstill(cycle: DriveCycle) -> None:
    for state in (cycle.state_at(0.0), cycle.state_at(cycle.duration)):
        assert state[sc.SELECTED_GEAR] == "P"
        assert num(state, sc.SPEED) == 0.0
        assert state[sc.DRIVER_DOOR_LOCKED] == "LOCKED"
        assert state[sc.DRIVER_DOOR_OPEN] == "Closed"
        assert state[sc.CURRENT_GEAR] == 0
    for _, state in samples(cycle, 0.01):
        if state[sc.SELECTED_GEAR] == "P":
            assert num(state, sc.SPEED) == 0.0


def test_door_and_lock_sequence(cycle: DriveCycle) -> None:
    transitions: list[tuple[str, sc.Value]] = []
    last: dict[str, sc.Value] = {}
    for _, state in samples(cycle, 0.01):
        for name in (sc.DRIVER_DOOR_LOCKED, sc.DRIVER_DOOR_OPEN, sc.SELECTED_GEAR):
            if last.get(name) != state[name]:
                transitions.append((name.rsplit(".", 1)[-1], state[name]))
                last[name] = state[name]
        if state[sc.DRIVER_DOOR_OPEN] == "Open":
            assert state[sc.DRIVER_DOOR_LOCKED] == "UNLOCKED"
            assert num(state, sc.SPEED) == 0.0
    assert transitions[3:] == [
        ("IsLocked", "UNLOCKED"), ("IsOpen", "Open"), ("IsOpen", "Closed"),
        ("SelectedGear", "D"), ("SelectedGear", "P"), ("IsOpen", "Open"), ("IsOpen", "Closed"),
        ("IsLocked", "LOCKED"),
    ]


def test_pedals_drive_acceleration(cycle: DriveCycle) -> None:
    for t, state in samples(cycle, 0.01):
        accel = num(state, sc.ACCELERATION)
        if accel > 0.05:
            assert num(state, sc.ACCELERATOR) > 0.0, t
            assert state[sc.SELECTED_GEAR] == "D"
        if accel < -1.0:
            assert num(state, sc.BRAKE) > 0.0, t
    cruise = cycle.phase("cruise")
    assert num(cycle.state_at(cruise.end - 0.01), sc.SPEED) == pytest.approx(90.0, abs=3.0)


def test_rotating_parts_follow_speed_and_gear() -> None:
    electric = DriveCycle(ScenarioConfig(powertrain="electric"))
    ratios = [num(s, sc.MOTOR_SPEED) / num(s, sc.SPEED)
              for _, s in samples(electric, 0.1) if num(s, sc.SPEED) > 1.0]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)  # fixed reduction gear
    diesel = DriveCycle(ScenarioConfig(powertrain="combustion"))
    gears_while_accelerating = [s[sc.CURRENT_GEAR] for t, s in samples(diesel, 0.05)
                                if diesel.phase_at(t).name == "accelerate"]
    assert gears_while_accelerating == sorted(gears_while_accelerating)  # upshifts only
    assert max(int(g) for g in gears_while_accelerating) >= 4
    for t, state in samples(diesel, 0.05):
        phase = diesel.phase_at(t).name
        if phase in ("accelerate", "cruise"):
            assert num(state, sc.ENGINE_SPEED) >= sc.IDLE_RPM - 1.0
        if phase in ("parked", "unlock", "lock", "parked_end"):
            assert num(state, sc.ENGINE_SPEED) < 50.0


def test_battery_follows_power() -> None:
    cycle = DriveCycle(ScenarioConfig(powertrain="electric"))
    accelerate, hard_brake = cycle.phase("accelerate"), cycle.phase("hard_brake")
    pulling = cycle.state_at(accelerate.start + 6.0)
    regen = cycle.state_at(hard_brake.start + 0.8)
    parked = cycle.state_at(0.0)
    assert num(pulling, sc.PACK_CURRENT) > 100.0
    assert num(regen, sc.PACK_CURRENT) < 0.0
    assert num(regen, sc.MOTOR_TORQUE) < 0.0 < num(pulling, sc.MOTOR_TORQUE)
    assert num(pulling, sc.PACK_VOLTAGE) < num(parked, sc.PACK_VOLTAGE) < num(regen, sc.PACK_VOLTAGE)
    assert num(cycle.state_at(accelerate.end), sc.SOC) < num(cycle.state_at(accelerate.start), sc.SOC)
    assert num(cycle.state_at(hard_brake.end), sc.SOC) > num(cycle.state_at(hard_brake.start), sc.SOC)
    cells = [num(parked, f"Vehicle.Powertrain.TractionBattery.Module{m}.CellVoltage{c}")
             for m in range(1, 9) for c in range(1, 13)]
    assert min(cells) == pytest.approx(num(parked, sc.CELL_MIN))
    assert max(cells) == pytest.approx(num(parked, sc.CELL_MAX))
    assert sum(cells) / len(cells) == pytest.approx(num(parked, sc.PACK_VOLTAGE) / 96, abs=0.01)


def test_fuel_is_burnt_only_while_the_engine_runs() -> None:
    cycle = DriveCycle(ScenarioConfig(powertrain="combustion"))
    start, park = cycle.phase("start"), cycle.phase("shift_park")
    assert num(cycle.state_at(start.start), sc.FUEL_LEVEL) == num(cycle.state_at(0), sc.FUEL_LEVEL)
    assert num(cycle.state_at(park.end), sc.FUEL_LEVEL) < num(cycle.state_at(start.start),
                                                                sc.FUEL_LEVEL)
    end = cycle.state_at(cycle.duration)
    assert num(end, sc.FUEL_LEVEL) == num(cycle.state_at(park.end + 0.5), sc.FUEL_LEVEL)
    assert num(cycle.state_at(cycle.phase("cruise").start), sc.FUEL_RATE) > 1.0


def test_low_voltage_battery_is_charged_while_on(cycle: DriveCycle) -> None:
    parked = cycle.state_at(0.0)
    driving = cycle.state_at(cycle.phase("cruise").start)
    assert num(driving, sc.LV_VOLTAGE) > num(parked, sc.LV_VOLTAGE) + 1.0
    assert num(driving, sc.LV_CURRENT) > 0.0 > num(parked, sc.LV_CURRENT)
    assert parked[sc.LV_STATE] == "OFF" and driving[sc.LV_STATE] == "ON"


def test_steering_turns_more_at_low_speed() -> None:
    cycle = DriveCycle()
    slow = [abs(num(s, sc.STEERING)) for _, s in samples(cycle, 0.01) if 3 < num(s, sc.SPEED) < 30]
    fast = [abs(num(s, sc.STEERING)) for _, s in samples(cycle, 0.01) if num(s, sc.SPEED) > 80]
    still = [num(s, sc.STEERING) for _, s in samples(cycle, 0.01) if num(s, sc.SPEED) == 0]
    assert max(slow) > 2 * max(fast) > 0.0
    assert set(still) == {0.0}


def test_looping_carries_odometer_and_charge_on() -> None:
    cycle = DriveCycle()
    one = cycle.state_at(cycle.duration)
    distance = num(one, sc.TRAVELED_DISTANCE) - num(cycle.state_at(0), sc.TRAVELED_DISTANCE)
    t = cycle.hard_brake_time + 0.5
    first, third = cycle.state_at(t, loop=True), cycle.state_at(t + 2 * cycle.duration, loop=True)
    assert num(third, sc.SPEED) == pytest.approx(num(first, sc.SPEED))
    assert num(third, sc.TRAVELED_DISTANCE) == pytest.approx(
        num(first, sc.TRAVELED_DISTANCE) + 2 * distance)
    assert num(third, sc.SOC) < num(first, sc.SOC)
    assert cycle.phase_at(t + 2 * cycle.duration, loop=True).name == "hard_brake"
    assert cycle.state_at(5 * cycle.duration)[sc.SELECTED_GEAR] == "P"  # no loop: stays parked


@settings(max_examples=200, deadline=None)
@given(t=st.floats(min_value=-5.0, max_value=200.0, allow_nan=False))
def test_every_value_is_finite_and_physical(t: float) -> None:
    state = HYBRID.state_at(t, loop=True)
    for name, value in state.items():
        if isinstance(value, float):
            assert math.isfinite(value), name
    assert num(state, sc.SPEED) >= 0.0
    for pedal in (sc.ACCELERATOR, sc.BRAKE):
        assert 0.0 <= num(state, pedal) <= 100.0
    assert 0.0 < num(state, sc.SOC) <= 100.0


def test_for_signals_picks_the_powertrain_and_cell_grid() -> None:
    ev = DriveCycle.for_signals([sc.SPEED, sc.SOC, "Vehicle.Powertrain.TractionBattery."
                                 "Module3.CellVoltage5"])
    assert ev.config.powertrain == "electric"
    assert (ev.config.battery_modules, ev.config.cells_per_module) == (3, 5)
    assert "Vehicle.Powertrain.TractionBattery.Module3.CellVoltage5" in ev.signal_names()
    assert DriveCycle.for_signals([sc.SPEED, sc.FUEL_LEVEL]).config.powertrain == "combustion"
    assert DriveCycle.for_signals([sc.ENGINE_SPEED, sc.MOTOR_SPEED]).config.powertrain == "hybrid"
    assert sc.ENGINE_SPEED not in ev.signal_names()


@pytest.mark.parametrize("bad", [
    {"stop": 0.5}, {"accelerate": 2.0, "cruise": 1.0}, {"cruise": 0.0}, {"cruise_speed_kmh": 40.0},
])
def test_impossible_configurations_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DriveCycle(ScenarioConfig(**bad))  # type: ignore[arg-type]


def test_phase_durations_are_configurable() -> None:
    cycle = DriveCycle(ScenarioConfig(parked=1.0, cruise=20.0))
    assert cycle.phase("cruise").duration == 20.0
    assert cycle.duration == pytest.approx(DriveCycle().duration - 4.0 + 12.0)


@pytest.mark.parametrize("profile_path", [SIM_PROFILE, *SHIPPED], ids=lambda p: p.stem)
def test_values_stay_inside_database_ranges(profile_path: Path) -> None:
    profile = load_profile(profile_path)
    cycle = DriveCycle.for_signals(profile.catalog)
    assert set(profile.catalog) <= cycle.signal_names()  # the scenario drives every signal
    for _, state in samples(cycle, 0.05):
        for name, entry in profile.catalog.items():
            value, signal = state[name], entry.signal
            if isinstance(value, str):
                assert signal.choices, f"{name}: {value!r} for a numeric signal"
                assert value in {str(v) for v in signal.choices.values()}, name
                continue
            if signal.minimum is not None:
                assert value >= signal.minimum, (name, value)
            if signal.maximum is not None:
                assert value <= signal.maximum, (name, value)
