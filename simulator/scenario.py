"""A physically consistent drive cycle, as canonical (COVESA VSS) signal values over time.

Pure: no I/O, no clock. :class:`DriveCycle` integrates a small longitudinal vehicle model
once, at construction, in fixed steps; :meth:`DriveCycle.state_at` then answers for any
scenario time. Within a step the acceleration is constant, so speed is exactly the integral
of acceleration and the odometer exactly the integral of speed at every ``t``, not only at
step boundaries.

The cycle: parked and locked -> unlock -> driver door opens and closes -> start (gear P->D)
-> accelerate to cruise speed -> cruise -> one hard brake (brake pedal above 80 % while
faster than 50 km/h) -> stop -> gear P, vehicle off -> door opens and closes -> lock ->
parked. A driver model chooses pedal positions; the pedals, not the script, set the
acceleration. Three powertrains: ``electric`` (one motor, fixed reduction), ``combustion``
(diesel, 8-speed automatic) and ``hybrid`` (parallel: engine and a motor on the gearbox
input, 6 speeds). :meth:`DriveCycle.for_signals` picks the one a profile's names call for.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

Powertrain = Literal["electric", "combustion", "hybrid"]
Value = float | int | str

HARD_BRAKE_PEDAL = 80.0  # % brake pedal that counts as a hard brake
HARD_BRAKE_MIN_SPEED = 50.0  # km/h the vehicle must exceed when the hard brake starts

SPEED = "Vehicle.Speed"
ACCELERATION = "Vehicle.Acceleration.Longitudinal"
TRAVELED_DISTANCE = "Vehicle.TraveledDistance"
ACCELERATOR = "Vehicle.Chassis.Accelerator.PedalPosition"
BRAKE = "Vehicle.Chassis.Brake.PedalPosition"
STEERING = "Vehicle.Chassis.SteeringWheel.Angle"
WHEEL_SPEEDS = {(row, side): f"Vehicle.Chassis.Axle.Row{row}.Wheel.{side}.Speed"
                for row in (1, 2) for side in ("Left", "Right")}
SELECTED_GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
CURRENT_GEAR = "Vehicle.Powertrain.Transmission.CurrentGear"
TRANSMISSION_TEMP = "Vehicle.Powertrain.Transmission.Temperature"
LV_VOLTAGE = "Vehicle.LowVoltageBattery.CurrentVoltage"
LV_CURRENT = "Vehicle.LowVoltageBattery.CurrentCurrent"
LV_STATE = "Vehicle.LowVoltageSystemState"
AIR_TEMP = "Vehicle.Exterior.AirTemperature"
CABIN_TEMP = "Vehicle.Cabin.HVAC.AmbientAirTemperature"
MIL_ON = "Vehicle.OBD.Status.IsMILOn"
MOTOR_SPEED = "Vehicle.Powertrain.ElectricMotor.Speed"
MOTOR_TORQUE = "Vehicle.Powertrain.ElectricMotor.Torque"
MOTOR_TEMP = "Vehicle.Powertrain.ElectricMotor.Temperature"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Displayed"
SOC_CURRENT = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
PACK_VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
PACK_CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
PACK_TEMP = "Vehicle.Powertrain.TractionBattery.Temperature.Average"
CELL_MIN = "Vehicle.Powertrain.TractionBattery.CellVoltage.Min"
CELL_MAX = "Vehicle.Powertrain.TractionBattery.CellVoltage.Max"
CHARGE_VOLTAGE_DC = "Vehicle.Powertrain.TractionBattery.Charging.ChargeVoltage.DC"
CHARGE_CURRENT_DC = "Vehicle.Powertrain.TractionBattery.Charging.ChargeCurrent.DC"
ENGINE_SPEED = "Vehicle.Powertrain.CombustionEngine.Speed"
ENGINE_TORQUE = "Vehicle.Powertrain.CombustionEngine.Torque"
ENGINE_ECT = "Vehicle.Powertrain.CombustionEngine.ECT"
ENGINE_EOT = "Vehicle.Powertrain.CombustionEngine.EOT"
ENGINE_LOAD = "Vehicle.OBD.EngineLoad"
FUEL_RATE = "Vehicle.OBD.FuelRate"
FUEL_LEVEL = "Vehicle.Powertrain.FuelSystem.RelativeLevel"
DRIVER_DOOR_LOCKED = "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"
TRUNK_LOCKED = "Vehicle.Body.Trunk.Rear.IsLocked"
TRUNK_OPEN = "Vehicle.Body.Trunk.Rear.IsOpen"
DOORS_OPEN = {
    (row, side): f"Vehicle.Cabin.Door.Row{row}.{side}.IsOpen"
    for row in (1, 2)
    for side in ("DriverSide", "PassengerSide")
}
DRIVER_DOOR_OPEN = DOORS_OPEN[(1, "DriverSide")]
CELL_VOLTAGE_RE = re.compile(r"^Vehicle\.Powertrain\.TractionBattery\.Module(\d+)\.CellVoltage(\d+)$")

ELECTRIC_SIGNALS = frozenset({MOTOR_SPEED, MOTOR_TORQUE, MOTOR_TEMP, SOC, SOC_CURRENT,
                              PACK_VOLTAGE, PACK_CURRENT, PACK_TEMP, CELL_MIN, CELL_MAX,
                              CHARGE_VOLTAGE_DC, CHARGE_CURRENT_DC})
COMBUSTION_SIGNALS = frozenset({ENGINE_SPEED, ENGINE_TORQUE, ENGINE_ECT, ENGINE_EOT,
                                ENGINE_LOAD, FUEL_RATE, FUEL_LEVEL})

G = 9.81
AIR_DENSITY = 1.2
BRAKE_DECEL_FULL = 10.0  # m/s^2 at 100 % brake pedal
CELL_RESISTANCE = 0.0006  # ohm per cell
PACK_CAPACITY_AH = 200.0
PACK_HEAT_CAPACITY = 3.0e5  # J/K
FUEL_TANK_L = 80.0
DIESEL_J_PER_L = 36e6
ENGINE_EFFICIENCY = 0.35
IDLE_RPM = 780.0
WHEELBASE = 2.9  # m
TRACK = 1.6  # m
STEERING_RATIO = 15.0


def cell_ocv(soc: float) -> float:
    """Open-circuit voltage of one Li-ion cell at a state of charge in %."""
    return 3.0 + 1.2 * soc / 100.0


@dataclass(frozen=True)
class Vehicle:
    mass: float  # kg
    drag_area: float  # Cd * A, m^2
    rolling: float  # rolling resistance coefficient
    wheel_radius: float  # m
    final_drive: float  # axle ratio behind the gearbox; the motor's reduction for an EV
    gear_ratios: tuple[float, ...] = ()  # automatic gearbox; empty for a single-speed EV
    engine_torque: float = 0.0  # Nm, 0 when there is no engine
    engine_power: float = 0.0  # W
    motor_torque: float = 0.0  # Nm, 0 when there is no motor
    motor_power: float = 0.0  # W
    max_accel: float = 2.4  # what the driver model asks for at most, m/s^2

    @property
    def has_engine(self) -> bool:
        return self.engine_torque > 0

    @property
    def has_motor(self) -> bool:
        return self.motor_torque > 0


ELECTRIC_SEDAN = Vehicle(mass=1950.0, drag_area=0.55, rolling=0.010, wheel_radius=0.33,
                         final_drive=9.0, motor_torque=350.0, motor_power=150e3)
DIESEL_VAN = Vehicle(mass=3000.0, drag_area=1.2, rolling=0.012, wheel_radius=0.34,
                     final_drive=3.5, gear_ratios=(4.71, 3.14, 2.11, 1.67, 1.29, 1.0, 0.84, 0.67),
                     engine_torque=380.0, engine_power=120e3, max_accel=2.0)
PARALLEL_HYBRID = Vehicle(mass=2100.0, drag_area=0.65, rolling=0.011, wheel_radius=0.33,
                          final_drive=3.7, gear_ratios=(4.15, 2.37, 1.56, 1.16, 0.86, 0.69),
                          engine_torque=300.0, engine_power=90e3, motor_torque=200.0,
                          motor_power=60e3)
VEHICLES: dict[str, Vehicle] = {"electric": ELECTRIC_SEDAN, "combustion": DIESEL_VAN,
                                "hybrid": PARALLEL_HYBRID}


@dataclass(frozen=True)
class ScenarioConfig:
    """Phase durations in seconds and the starting condition of the vehicle."""

    parked: float = 3.0
    unlock: float = 1.0
    door_open: float = 2.0
    door_close: float = 1.0
    start: float = 2.0
    accelerate: float = 12.0
    cruise: float = 8.0
    hard_brake: float = 1.5
    stop: float = 5.0
    shift_park: float = 1.5
    lock: float = 1.0
    cruise_speed_kmh: float = 90.0
    powertrain: Powertrain = "electric"
    battery_modules: int = 8
    cells_per_module: int = 12
    cells_in_series: int = 96
    initial_odometer_km: float = 12_345.6
    initial_soc: float = 80.0
    initial_fuel: float = 65.0
    initial_coolant_c: float = 35.0
    ambient_c: float = 20.0
    step: float = 0.01

    def phase_durations(self) -> list[tuple[str, float]]:
        return [
            ("parked", self.parked),
            ("unlock", self.unlock),
            ("enter_door_open", self.door_open),
            ("enter_door_closed", self.door_close),
            ("start", self.start),
            ("accelerate", self.accelerate),
            ("cruise", self.cruise),
            ("hard_brake", self.hard_brake),
            ("stop", self.stop),
            ("shift_park", self.shift_park),
            ("exit_door_open", self.door_open),
            ("exit_door_closed", self.door_close),
            ("lock", self.lock),
            ("parked_end", self.parked),
        ]


@dataclass(frozen=True)
class Phase:
    name: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end


# Continuous quantities sampled once per step and interpolated linearly in between.
_SERIES = ("accel_pedal", "brake_pedal", "steering", "lv_voltage", "lv_current", "soc",
           "pack_voltage", "pack_current", "pack_temp", "motor_rpm", "motor_torque", "motor_temp",
           "fuel", "fuel_rate", "engine_rpm", "engine_torque", "engine_load", "coolant",
           "oil_temp", "transmission_temp", "cabin_temp")


class _Trace:
    """Per-step samples of the integrated model (index i is time i * step)."""

    def __init__(self) -> None:
        self.v: list[float] = []  # m/s at the start of the step
        self.a: list[float] = []  # m/s^2 during the step
        self.x: list[float] = []  # m at the start of the step
        self.gear: list[int] = []
        self.series: dict[str, list[float]] = {name: [] for name in _SERIES}


class DriveCycle:
    """One drive cycle; ``state_at(t)`` maps canonical signal names to physical values."""

    def __init__(self, config: ScenarioConfig | None = None) -> None:
        self.config = config or ScenarioConfig()
        if self.config.powertrain not in VEHICLES:
            raise ValueError(f"powertrain must be one of {', '.join(VEHICLES)}, "
                             f"got {self.config.powertrain!r}")
        self.vehicle = VEHICLES[self.config.powertrain]
        self.phases = self._build_phases()
        self.duration = self.phases[-1].end
        self._starts = [p.start for p in self.phases]
        self._by_name = {p.name: p for p in self.phases}
        start, park = self._by_name["start"], self._by_name["shift_park"]
        self._on_from, self._on_until = start.start, park.end
        self._drive_from = start.start + 0.6 * start.duration
        self._park_from = park.start + 0.3 * park.duration
        self._cranking_until = start.start + min(0.8, 0.4 * start.duration)
        self._acc_from, self._acc_until = self._by_name["unlock"].start, self._by_name["lock"].start
        self._cells = [(f"Vehicle.Powertrain.TractionBattery.Module{m}.CellVoltage{c}",
                        self._cell_offset(m, c))
                       for m in range(1, self.config.battery_modules + 1)
                       for c in range(1, self.config.cells_per_module + 1)]
        # Pack-wide extremes, whichever cells the grid names.
        offsets = [self._cell_offset(m, c) for m in range(1, 9) for c in range(1, 13)]
        self._cell_spread = (min(offsets), max(offsets))
        self._loop_delta: dict[str, float] = {}
        self._trace = self._integrate()
        self.hard_brake_time = self._check_hard_brake()
        self._check_stopped()
        first, last = self.state_at(0.0), self.state_at(self.duration)
        # What one pass adds to the quantities that carry over when the cycle loops.
        self._loop_delta = {name: float(last[name]) - float(first[name])
                            for name in (TRAVELED_DISTANCE, SOC, SOC_CURRENT, FUEL_LEVEL)
                            if name in first}

    @classmethod
    def for_signals(cls, names: Iterable[str], config: ScenarioConfig | None = None) -> DriveCycle:
        """A cycle whose powertrain and battery-cell grid are what the canonical names need.

        Electric and combustion names together make a hybrid; the cell grid is just large
        enough for the ``Module<N>.CellVoltage<M>`` names present.
        """
        names = set(names)
        config = config or ScenarioConfig()
        electric = any(n in ELECTRIC_SIGNALS or CELL_VOLTAGE_RE.match(n) for n in names)
        combustion = any(n in COMBUSTION_SIGNALS for n in names)
        powertrain: Powertrain = ("hybrid" if electric and combustion
                                  else "combustion" if combustion else "electric")
        modules = cells = 0
        for name in names:
            match = CELL_VOLTAGE_RE.match(name)
            if match:
                modules = max(modules, int(match.group(1)))
                cells = max(cells, int(match.group(2)))
        return cls(replace(config, powertrain=powertrain, battery_modules=modules,
                           cells_per_module=cells))

    # -- public queries -------------------------------------------------------------------

    def signal_names(self) -> frozenset[str]:
        return frozenset(self.state_at(0.0))

    def phase(self, name: str) -> Phase:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no phase {name!r} (phases: "
                           f"{', '.join(p.name for p in self.phases)})") from None

    def phase_at(self, t: float, *, loop: bool = False) -> Phase:
        t = self._cycle_time(t, loop)[1]
        index = max(0, min(len(self.phases) - 1, bisect.bisect_right(self._starts, t) - 1))
        return self.phases[index]

    def boundaries(self) -> list[float]:
        """Phase start times and the end of the cycle."""
        return [*self._starts, self.duration]

    def state_at(self, t: float, *, loop: bool = False) -> dict[str, Value]:
        """Canonical name -> physical value at scenario time ``t`` seconds.

        Without ``loop`` times outside the cycle give its first or last state. With ``loop`` the
        cycle repeats and the odometer, state of charge and fuel level carry on across passes.
        """
        passes, t = self._cycle_time(t, loop)
        cfg, tr, veh = self.config, self._trace, self.vehicle
        last = len(tr.v) - 1
        i = min(int(t / cfg.step), last)
        tau = t - i * cfg.step
        j = min(i + 1, last)
        w = tau / cfg.step if j != i else 0.0

        def at(name: str) -> float:
            series = tr.series[name]
            return series[i] * (1.0 - w) + series[j] * w  # stays within the two samples

        v = max(0.0, tr.v[i] + tr.a[i] * tau)
        x = tr.x[i] + tr.v[i] * tau + 0.5 * tr.a[i] * tau * tau
        phase = self.phase_at(t).name
        door_open = phase in ("enter_door_open", "exit_door_open")
        locked = "LOCKED" if phase in ("parked", "lock", "parked_end") else "UNLOCKED"
        steering = at("steering")
        kmh = v * 3.6
        # Outer wheels turn faster in a curve: curvature from the road-wheel angle.
        curvature = math.tan(math.radians(steering / STEERING_RATIO)) / WHEELBASE
        state: dict[str, Value] = {
            SPEED: kmh,
            ACCELERATION: tr.a[i],
            TRAVELED_DISTANCE: cfg.initial_odometer_km + x / 1000.0,
            ACCELERATOR: at("accel_pedal"),
            BRAKE: at("brake_pedal"),
            STEERING: steering,
            SELECTED_GEAR: self._selected_gear(t),
            CURRENT_GEAR: tr.gear[i],
            LV_VOLTAGE: at("lv_voltage"),
            LV_CURRENT: at("lv_current"),
            LV_STATE: self._power_state(t),
            AIR_TEMP: cfg.ambient_c,
            CABIN_TEMP: at("cabin_temp"),
            MIL_ON: "Off",
            DRIVER_DOOR_LOCKED: locked,
            TRUNK_LOCKED: locked,
            TRUNK_OPEN: "Closed",
        }
        for (_row, side), name in WHEEL_SPEEDS.items():
            sign = 1.0 if side == "Right" else -1.0  # positive angle turns left
            state[name] = kmh * (1.0 + sign * curvature * TRACK / 2.0)
        for key, name in DOORS_OPEN.items():
            state[name] = "Open" if door_open and key == (1, "DriverSide") else "Closed"
        if veh.has_engine:
            state.update({
                ENGINE_SPEED: at("engine_rpm"),
                ENGINE_TORQUE: at("engine_torque"),
                ENGINE_ECT: at("coolant"),
                ENGINE_EOT: at("oil_temp"),
                ENGINE_LOAD: at("engine_load"),
                FUEL_RATE: at("fuel_rate"),
                FUEL_LEVEL: at("fuel"),
                TRANSMISSION_TEMP: at("transmission_temp"),
            })
        if veh.has_motor:
            pack_voltage = at("pack_voltage")
            cell = pack_voltage / cfg.cells_in_series
            soc = at("soc")
            state.update({
                MOTOR_SPEED: at("motor_rpm"),
                MOTOR_TORQUE: at("motor_torque"),
                MOTOR_TEMP: at("motor_temp"),
                SOC: soc,
                SOC_CURRENT: soc,
                PACK_VOLTAGE: pack_voltage,
                PACK_CURRENT: at("pack_current"),
                PACK_TEMP: at("pack_temp"),
                CELL_MIN: cell + self._cell_spread[0],
                CELL_MAX: cell + self._cell_spread[1],
                CHARGE_VOLTAGE_DC: 0.0,  # not plugged in
                CHARGE_CURRENT_DC: 0.0,
            })
            for name, offset in self._cells:
                state[name] = cell + offset
        for name, delta in self._loop_delta.items() if passes else ():
            value = float(state[name]) + passes * delta
            state[name] = value if name == TRAVELED_DISTANCE else max(1.0, value)
        return state

    # -- construction ---------------------------------------------------------------------

    def _cycle_time(self, t: float, loop: bool) -> tuple[int, float]:
        if loop and t >= self.duration:
            passes = int(t // self.duration)
            return passes, t - passes * self.duration
        return 0, min(max(t, 0.0), self.duration)

    def _build_phases(self) -> tuple[Phase, ...]:
        cfg = self.config
        if cfg.step <= 0 or cfg.step > 0.1:
            raise ValueError(f"step must be in (0, 0.1] s, got {cfg.step}")
        if not 55.0 <= cfg.cruise_speed_kmh <= 160.0:
            raise ValueError("cruise_speed_kmh must be 55..160 so the hard brake starts above "
                             f"{HARD_BRAKE_MIN_SPEED:g} km/h")
        if cfg.battery_modules < 0 or cfg.cells_per_module < 0 or cfg.cells_in_series < 1:
            raise ValueError("battery cell counts must not be negative")
        phases: list[Phase] = []
        t = 0.0
        for name, duration in cfg.phase_durations():
            if duration <= 0:
                raise ValueError(f"phase {name} must last > 0 s, got {duration}")
            phases.append(Phase(name, t, t + duration))
            t += duration
        return tuple(phases)

    def _vehicle_on(self, t: float) -> bool:
        return self._on_from <= t < self._on_until

    def _selected_gear(self, t: float) -> str:
        return "D" if self._drive_from <= t < self._park_from else "P"

    def _power_state(self, t: float) -> str:
        """Ignition as VSS LowVoltageSystemState: OFF, ACC, START (cranking), ON."""
        if self._vehicle_on(t):
            return "START" if t < self._cranking_until else "ON"
        if self._acc_from <= t < self._acc_until:
            return "ACC"
        return "OFF"

    def _integrate(self) -> _Trace:
        cfg, veh = self.config, self.vehicle
        dt = cfg.step
        n = round(self.duration / dt) + 1
        tr = _Trace()
        out = tr.series
        v = x = accel_pedal = brake_pedal = engine_rpm = 0.0
        soc, fuel, coolant = cfg.initial_soc, cfg.initial_fuel, cfg.initial_coolant_c
        oil = transmission = coolant
        pack_temp, motor_temp, cabin, lv = 25.0, cfg.ambient_c + 10.0, cfg.ambient_c, 12.6
        gear = 1
        target_v = cfg.cruise_speed_kmh / 3.6
        stop = self.phase("stop")
        stop_by = stop.end - min(1.0, 0.25 * stop.duration)
        shift_park = self.phase("shift_park")
        series_in_cells = cfg.cells_in_series
        pack_resistance = series_in_cells * CELL_RESISTANCE
        for k in range(n):
            t = k * dt
            phase = self.phase_at(t).name
            on = self._vehicle_on(t)
            in_drive = self._selected_gear(t) == "D"
            wheel_rpm = v / veh.wheel_radius * 60.0 / (2 * math.pi)
            if veh.gear_ratios:
                gear = self._shift(gear, wheel_rpm, in_drive)
            # Transmission input speed (what the engine and a gearbox motor turn at).
            ratio = (veh.gear_ratios[gear - 1] if veh.gear_ratios else 1.0) * veh.final_drive
            input_rpm = wheel_rpm * ratio if in_drive else 0.0
            resist = self._resistance(v)
            engine_force, motor_force = self._available_forces(v, input_rpm, ratio)
            available = engine_force + motor_force

            # Driver model: pedal targets, then pedal movement at human rates.
            accel_target = brake_target = 0.0
            if phase == "start":
                brake_target = 40.0
            elif phase in ("accelerate", "cruise"):
                wanted = min(veh.max_accel, max(-0.5, 0.8 * (target_v - v)))
                accel_target = 100.0 * (veh.mass * wanted + resist) / available
            elif phase == "hard_brake":
                brake_target = 95.0
            elif phase == "stop":
                if v > 0.0:
                    decel = v / max(stop_by - t, dt) - resist / veh.mass
                    brake_target = min(75.0, 100.0 * decel / BRAKE_DECEL_FULL)
                else:
                    brake_target = 35.0
            elif phase == "shift_park" and t < shift_park.start + 0.7 * shift_park.duration:
                brake_target = 35.0
            accel_pedal = _approach(accel_pedal, min(100.0, max(0.0, accel_target)),
                                    80.0 * dt, 300.0 * dt)
            brake_pedal = _approach(brake_pedal, min(100.0, max(0.0, brake_target)),
                                    400.0 * dt, 200.0 * dt)

            # Pedals -> forces -> acceleration.
            share = accel_pedal / 100.0 if in_drive and on else 0.0
            engine_drive, motor_drive = share * engine_force, share * motor_force
            brake_decel = brake_pedal / 100.0 * BRAKE_DECEL_FULL if v > 0.0 else 0.0
            a = (engine_drive + motor_drive - resist) / veh.mass - brake_decel
            if v <= 0.0 and a < 0.0:
                a = 0.0  # standing still: brakes and friction hold the vehicle
            if v + a * dt < 0.0:
                a = -v / dt  # come to rest exactly at the end of this step

            # Motor and traction battery: regenerative braking takes part of the brake force.
            regen = 0.0
            if veh.has_motor and v > 1.5 and brake_decel > 0.0 and on:
                regen_limit = 0.5 * veh.motor_torque * self._motor_ratio(ratio) / veh.wheel_radius
                regen = min(brake_decel * veh.mass, regen_limit)
            motor_torque = ((motor_drive - regen) * veh.wheel_radius / self._motor_ratio(ratio)
                            if veh.has_motor else 0.0)
            motor_rpm = (wheel_rpm * veh.final_drive if not veh.gear_ratios else input_rpm)
            ocv = series_in_cells * cell_ocv(soc)
            battery_power = ((motor_drive / 0.9 - regen * 0.7) * v + (600.0 if on else 40.0)
                             if veh.has_motor else 0.0)
            pack_voltage = (ocv + math.sqrt(ocv * ocv - 4.0 * pack_resistance * battery_power)) / 2
            pack_current = battery_power / pack_voltage

            # Engine: idles when on, follows the gearbox input in gear; fuel cut on overrun.
            engine_torque = engine_load = fuel_rate = 0.0
            if veh.has_engine and on:
                rpm_target = max(IDLE_RPM, input_rpm) + (0.0 if in_drive else 8.0 * accel_pedal)
                engine_rpm += (rpm_target - engine_rpm) * min(1.0, dt / 0.2)
                omega = max(engine_rpm, 1.0) * 2 * math.pi / 60.0
                accessories = 1500.0
                if engine_drive > 0.0:
                    engine_torque = engine_drive * veh.wheel_radius / ratio + accessories / omega
                elif in_drive and accel_pedal < 1.0 and input_rpm > IDLE_RPM + 200.0:
                    engine_torque = -25.0  # engine braking, injectors off
                else:
                    engine_torque = accessories / omega
                engine_load = max(0.0, 100.0 * engine_torque / veh.engine_torque)
                if engine_torque > 0.0:
                    power = engine_torque * omega
                    fuel_rate = power / (ENGINE_EFFICIENCY * DIESEL_J_PER_L) * 3600.0  # l/h
            elif veh.has_engine:
                engine_rpm += (0.0 - engine_rpm) * min(1.0, dt / 0.3)

            lv_target = 14.3 if on else 12.6
            lv_current = ((lv_target - lv) * 30.0 + 3.0 if on
                          else -1.5 - (3.0 if phase.endswith("door_open") else 0.0))
            lv += (lv_target - lv) * min(1.0, dt / 0.8)

            tr.v.append(v)
            tr.a.append(a)
            tr.x.append(x)
            tr.gear.append((gear if veh.gear_ratios else 1) if in_drive else 0)
            for name, value in (
                ("accel_pedal", accel_pedal), ("brake_pedal", brake_pedal),
                ("steering", self._steering(t, v)), ("lv_voltage", lv), ("lv_current", lv_current),
                ("soc", soc), ("pack_voltage", pack_voltage), ("pack_current", pack_current),
                ("pack_temp", pack_temp), ("motor_rpm", motor_rpm), ("motor_torque", motor_torque),
                ("motor_temp", motor_temp), ("fuel", fuel), ("fuel_rate", fuel_rate),
                ("engine_rpm", engine_rpm), ("engine_torque", engine_torque),
                ("engine_load", engine_load), ("coolant", coolant), ("oil_temp", oil),
                ("transmission_temp", transmission), ("cabin_temp", cabin),
            ):
                out[name].append(value)

            # Integrate to the next step.
            x += v * dt + 0.5 * a * dt * dt
            v = max(0.0, v + a * dt)
            soc -= pack_current * dt / (PACK_CAPACITY_AH * 3600.0) * 100.0
            fuel -= fuel_rate / 3600.0 * dt / FUEL_TANK_L * 100.0
            pack_temp += (pack_current ** 2 * pack_resistance * dt) / PACK_HEAT_CAPACITY
            motor_temp += (abs(motor_torque) / 350.0 * 0.8
                           - (motor_temp - cfg.ambient_c) * 0.001) * dt
            if veh.has_engine and on:
                coolant = min(90.0, coolant + (0.15 + engine_load * 0.004) * dt)
            else:
                coolant -= (coolant - cfg.ambient_c) * 0.002 * dt
            oil += (coolant + 5.0 - oil) * 0.01 * dt
            transmission += (coolant - transmission) * 0.005 * dt
            cabin += ((22.0 if on else cfg.ambient_c) - cabin) * dt / 120.0
        return tr

    def _motor_ratio(self, gearbox_ratio: float) -> float:
        """Motor revolutions per wheel revolution: fixed for an EV, the gearbox's for a P2."""
        return self.vehicle.final_drive if not self.vehicle.gear_ratios else gearbox_ratio

    def _resistance(self, v: float) -> float:
        veh = self.vehicle
        rolling = veh.mass * G * veh.rolling if v > 0.0 else 0.0
        return rolling + 0.5 * AIR_DENSITY * veh.drag_area * v * v

    def _available_forces(self, v: float, input_rpm: float, ratio: float) -> tuple[float, float]:
        """Most tractive force the engine and the motor can give now (torque or power bound)."""
        veh = self.vehicle
        engine = motor = 0.0
        if veh.has_engine:
            omega = max(input_rpm, IDLE_RPM) * 2 * math.pi / 60.0
            engine = min(veh.engine_torque, veh.engine_power / omega) * ratio / veh.wheel_radius
        if veh.has_motor:
            motor_ratio = self._motor_ratio(ratio)
            motor = min(veh.motor_torque * motor_ratio / veh.wheel_radius,
                        veh.motor_power / max(v, 0.1))
        return engine, motor

    def _shift(self, gear: int, wheel_rpm: float, in_drive: bool) -> int:
        veh = self.vehicle
        if not in_drive or wheel_rpm < 1.0:
            return 1
        rpm = wheel_rpm * veh.gear_ratios[gear - 1] * veh.final_drive
        if rpm > 2100.0 and gear < len(veh.gear_ratios):
            return gear + 1
        if rpm < 1100.0 and gear > 1:
            return gear - 1
        return gear

    @staticmethod
    def _steering(t: float, v: float) -> float:
        """Steering-wheel angle: big turns at manoeuvring speed, small corrections when fast."""
        kmh = v * 3.6
        amplitude = 14.0 * kmh / (1.0 + (kmh / 12.0) ** 2)
        return amplitude * (0.8 * math.sin(2 * math.pi * t / 9.0)
                            + 0.2 * math.sin(2 * math.pi * t / 2.3))

    @staticmethod
    def _cell_offset(module: int, cell: int) -> float:
        """A fixed, small per-cell deviation (+-10 mV) so cells are told apart."""
        return ((module * 7 + cell * 13) % 11 - 5) * 0.002

    def _check_hard_brake(self) -> float:
        brake, dt = self._trace.series["brake_pedal"], self.config.step
        crossings = [k for k in range(len(brake) - 1)
                     if brake[k] <= HARD_BRAKE_PEDAL < brake[k + 1]]
        if len(crossings) != 1:
            raise ValueError(f"expected exactly one hard brake, the model has {len(crossings)}")
        k = crossings[0]
        t = k * dt + (HARD_BRAKE_PEDAL - brake[k]) / (brake[k + 1] - brake[k]) * dt
        kmh = float(self.state_at(t)[SPEED])
        if kmh <= HARD_BRAKE_MIN_SPEED:
            raise ValueError(f"the hard brake starts at {kmh:.1f} km/h, not above "
                             f"{HARD_BRAKE_MIN_SPEED:g}: lengthen accelerate/cruise")
        return t

    def _check_stopped(self) -> None:
        stop = self.phase("stop")
        kmh = float(self.state_at(stop.end)[SPEED])
        if kmh > 0.0:
            raise ValueError(f"the stop phase ({stop.duration:g} s) is too short: still at "
                             f"{kmh:.1f} km/h when it ends")


def _approach(current: float, target: float, up: float, down: float) -> float:
    """Move toward ``target`` by at most ``up`` (rising) or ``down`` (falling)."""
    if target > current:
        return min(target, current + up)
    return max(target, current - down)


__all__ = ["COMBUSTION_SIGNALS", "DRIVER_DOOR_OPEN", "ELECTRIC_SIGNALS", "HARD_BRAKE_MIN_SPEED",
           "HARD_BRAKE_PEDAL", "DriveCycle", "Phase", "Powertrain", "ScenarioConfig", "Value",
           "Vehicle"]
