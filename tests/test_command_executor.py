"""Remote commands executed on the vehicle: the real pipeline, real python-can virtual buses
and the simulated vehicle (whose body control module answers lock requests), in-process.

An independent listener on the body bus sees exactly what the agent transmits. A few unit
tests at the end drive the executor with injected I/O for what a vehicle cannot show
(sliding rate-limit windows, defense in depth, engine refusals).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
import pytest
import structlog

from agent.clock import Clock
from agent.commands.executor import CommandExecutor, parameter_specs
from agent.config import BusOverride, CanSettings, ClockSettings
from agent.errors import BusUnavailable
from agent.pipeline import Pipeline, PipelineSettings
from agent.profile.loader import LoadedProfile, load_profile
from agent.profile.model import PeriodicRule
from agent.records import Record, Sample, SignalValue
from agent.rules import RuleEngine
from agent.sinks import MemorySink
from simulator import cli as sim_cli
from simulator.actuators import parse_faults
from simulator.runner import Simulator
from simulator.scenario import ScenarioConfig
from simulator.testing import virtual_buses

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "firmware_profiles" / "ev_sedan" / "ev_sedan.yaml"
SPEED = "Vehicle.Speed"
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
LOCKED = "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"
REQUEST_ID = 0x5A0  # TCU_RemoteLockRequest
PARKED = ScenarioConfig(parked=60.0)  # parked and locked for longer than any test
# Reaches the accelerate phase 3 s (scenario) after the start and drives for a minute.
DRIVING = ScenarioConfig(parked=0.5, unlock=0.5, door_open=0.5, door_close=0.5, start=1.0,
                         accelerate=30.0, cruise=30.0)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(scope="module")
def profile() -> LoadedProfile:
    return load_profile(PROFILE)


class Reports:
    """What the executor reported, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, state: str, detail: dict[str, Any]) -> None:
        with self._lock:
            self.items.append((state, detail))

    @property
    def states(self) -> list[str]:
        return [state for state, _ in self.items]

    @property
    def final(self) -> dict[str, Any]:
        return self.items[-1][1]


@dataclass
class Rig:
    profile: LoadedProfile
    pipeline: Pipeline
    sink: MemorySink
    executor: CommandExecutor
    listener: can.BusABC
    sim: Simulator | None
    requests: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, params: Mapping[str, Any] | None = None, command_id: str = "cmd-1") -> Reports:
        reports = Reports()
        self.executor.execute(name, dict(params or {}), command_id, reports)
        return reports

    def lock_requests(self, settle: float = 0.2) -> list[dict[str, Any]]:
        """Every TCU_RemoteLockRequest the listener saw so far, decoded (waits ``settle`` s for more)."""
        message = self.profile.databases["body"].get_message_by_name("TCU_RemoteLockRequest")
        deadline = time.monotonic() + settle
        while True:
            frame = self.listener.recv(timeout=max(0.0, deadline - time.monotonic()))
            if frame is None:
                return list(self.requests)
            if frame.arbitration_id == REQUEST_ID:
                decoded = message.decode(bytes(frame.data), decode_choices=True)
                assert isinstance(decoded, Mapping)
                self.requests.append({k: str(v) if k == "TCU_LockRequest" else v for k, v in decoded.items()})

    def samples(self, rule: str, signal: str | None = None) -> list[Sample]:
        return [r for r in list(self.sink.records) if isinstance(r, Sample) and r.rule == rule
                and (signal is None or r.signal == signal)]


@contextmanager
def rig(profile: LoadedProfile, scenario: ScenarioConfig | None = PARKED, *, time_scale: float = 1.0,
        faults: Iterable[str] = (), only: Iterable[str] | None = None, run_pipeline: bool = True,
        wait_for_signals: Iterable[str] = (SPEED, GEAR, LOCKED)) -> Iterator[Rig]:
    """Pipeline + executor (+ simulator unless ``scenario`` is None) on fresh virtual buses."""
    buses = virtual_buses(profile)
    listener = can.Bus(interface="virtual", channel=buses["body"][1])  # before anything sends
    sink = MemorySink()
    pipeline = Pipeline(profile, sink, {n: BusOverride(interface=i, channel=c) for n, (i, c) in buses.items()},
                        PipelineSettings(CanSettings(), ClockSettings(synced="assume_synced")))
    thread = threading.Thread(target=pipeline.run, daemon=True)
    sim = None
    executor = CommandExecutor.for_pipeline(pipeline)
    try:
        if run_pipeline:
            thread.start()
            assert pipeline.wait_ready(5)
        if scenario is not None:
            sim = Simulator(profile, buses=buses, scenario=scenario, time_scale=time_scale, faults=faults, only=only)
            sim.start()
            names = list(wait_for_signals)
            assert wait_for(lambda: len(pipeline.live_values(names)) == len(names)), pipeline.live_values(names)
        yield Rig(profile, pipeline, sink, executor, listener, sim)
    finally:
        executor.close()
        if sim is not None:
            sim.stop()
        pipeline.stop()
        if run_pipeline:
            thread.join(10)
        listener.shutdown()


# -- CAN actuation end to end ------------------------------------------------------------

def test_unlock_and_lock_reach_the_vehicle_and_are_confirmed(profile: LoadedProfile) -> None:
    with rig(profile) as r:
        assert r.pipeline.live_values([LOCKED])[LOCKED][0] == "LOCKED"
        unlock = r.run("unlock_doors")
        assert unlock.states == ["in_progress", "succeeded"], unlock.items
        assert unlock.final["observed"] == "UNLOCKED" and unlock.final["frames_sent"] == 3
        assert unlock.final["after_ms"] > 0
        assert r.sim is not None and r.sim.state()[LOCKED] == "UNLOCKED"

        lock = r.run("lock_doors", command_id="cmd-2")
        assert lock.states == ["in_progress", "succeeded"], lock.items
        assert lock.final["observed"] == "LOCKED"

        frames = r.lock_requests()
        assert [f["TCU_LockRequest"] for f in frames] == ["Unlock"] * 3 + ["Lock"] * 3
        assert [f["TCU_RemoteLockRequest_Counter"] for f in frames] == [0, 1, 2, 3, 4, 5]
        assert all(f["TCU_RequestId"] == 0 for f in frames)
        assert r.sim.locking.stats.applied == 2
        # The lock state changes reached the collection rules too (on_change doors_locks).
        assert wait_for(lambda: [s.value for s in r.samples("doors_locks", LOCKED)][-2:] == ["UNLOCKED", "LOCKED"])


def test_a_broken_lock_actuator_makes_the_confirmation_fail(profile: LoadedProfile) -> None:
    with rig(profile, faults={"lock_actuator"}) as r:
        reports = r.run("unlock_doors")
        assert reports.states == ["in_progress", "failed"], reports.items
        final = reports.final
        assert final["reason"] == "confirmation_timeout"
        assert final["observed"] == "LOCKED" and final["expected"] == "UNLOCKED" and final["updated"] is True
        assert len(r.lock_requests()) == 3  # sent, but the BCM ignored them
        assert r.sim is not None and r.sim.locking.stats.ignored == 3 and r.sim.locking.stats.applied == 0


def test_no_feedback_at_all_times_out(profile: LoadedProfile) -> None:
    # Only the powertrain is simulated: nothing ever reports the lock state.
    with rig(profile, only=["powertrain"], wait_for_signals=[SPEED]) as r:
        reports = r.run("lock_doors")
        assert reports.states == ["in_progress", "timed_out"], reports.items
        assert reports.final["reason"] == "confirmation_timeout"
        assert reports.final["observed"] is None and reports.final["updated"] is False
        assert [f["TCU_LockRequest"] for f in r.lock_requests()] == ["Lock"] * 3


# -- preconditions -----------------------------------------------------------------------

def test_unlock_is_refused_while_driving_and_nothing_is_sent(profile: LoadedProfile) -> None:
    with rig(profile, DRIVING, time_scale=2.0) as r:
        assert wait_for(lambda: float(r.pipeline.live_values([SPEED]).get(SPEED, (0.0, 0))[0]) > 5, timeout=15)
        reports = r.run("unlock_doors")
        assert reports.states == ["in_progress", "failed"], reports.items
        assert reports.final["reason"] == "precondition_failed"
        assert reports.final["condition"] == "Vehicle.Speed == 0"
        assert reports.final["values"][SPEED] > 5
        assert r.lock_requests(settle=0.3) == []


def test_a_stale_speed_refuses_unlock(profile: LoadedProfile) -> None:
    with rig(profile) as r:
        assert r.sim is not None
        r.sim.stop()  # the vehicle's buses go quiet; the last values stay in the engine
        clock = r.pipeline.clock
        seen = r.pipeline.live_values([SPEED])[SPEED][1]
        assert wait_for(lambda: clock.monotonic() - seen > 1.05, timeout=5)
        reports = r.run("unlock_doors")
        assert reports.states == ["in_progress", "failed"], reports.items
        assert reports.final["reason"] == "precondition_stale_signal"
        assert reports.final["age_ms"][SPEED] > 1000 and reports.final["max_age_ms"] == 1000
        assert r.lock_requests(settle=0.3) == []


def test_a_signal_never_received_refuses_unlock(profile: LoadedProfile) -> None:
    with rig(profile, scenario=None) as r:
        reports = r.run("unlock_doors")
        assert reports.states == ["in_progress", "failed"]
        assert reports.final["reason"] == "precondition_missing_signal"
        assert reports.final["signals"] == [SPEED]
        assert r.lock_requests(settle=0.3) == []


def test_a_bus_that_is_not_open_fails_the_command(profile: LoadedProfile) -> None:
    with rig(profile, scenario=None, run_pipeline=False) as r:
        reports = r.run("lock_doors")
        assert reports.states == ["in_progress", "failed"]
        assert reports.final["reason"] == "bus_unavailable" and reports.final["frames_sent"] == 0


# -- rate limit and serialization ----------------------------------------------------------

def test_rate_limit_rejects_the_sixth_lock_within_a_minute(profile: LoadedProfile) -> None:
    with rig(profile) as r:
        for i in range(5):
            reports = r.run("lock_doors", command_id=f"cmd-{i}")
            assert reports.states == ["in_progress", "succeeded"], (i, reports.items)
        sixth = r.run("lock_doors", command_id="cmd-6")
        assert sixth.states == ["rejected"]  # never started: no in_progress
        assert sixth.final["reason"] == "rate_limited"
        assert sixth.final["max_commands"] == 5 and 0 < sixth.final["retry_after_s"] <= 60
        frames = r.lock_requests()
        assert len(frames) == 15  # 5 commands x repeat 3; the sixth sent nothing
        assert [f["TCU_RemoteLockRequest_Counter"] for f in frames] == list(range(15))
        # unlock has its own budget
        assert r.run("unlock_doors").states == ["in_progress", "succeeded"]


def test_two_commands_on_one_bus_are_serialized(profile: LoadedProfile) -> None:
    with rig(profile) as r:
        barrier = threading.Barrier(2)
        results: dict[str, Reports] = {}

        def run(name: str) -> None:
            barrier.wait()
            results[name] = r.run(name, command_id=name)

        threads = [threading.Thread(target=run, args=(n,)) for n in ("unlock_doors", "lock_doors")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert all(results[n].states == ["in_progress", "succeeded"] for n in results), results
        frames = r.lock_requests()
        kinds = [f["TCU_LockRequest"] for f in frames]
        assert kinds in (["Unlock"] * 3 + ["Lock"] * 3, ["Lock"] * 3 + ["Unlock"] * 3), kinds
        assert [f["TCU_RemoteLockRequest_Counter"] for f in frames] == list(range(6))
        # Each confirmation saw its own command's effect.
        assert results["unlock_doors"].final["observed"] == "UNLOCKED"
        assert results["lock_doors"].final["observed"] == "LOCKED"


# -- local actions -----------------------------------------------------------------------------

def test_snapshot_emits_the_current_values_as_samples(profile: LoadedProfile) -> None:
    with rig(profile) as r:
        reports = r.run("snapshot")
        assert reports.states == ["in_progress", "succeeded"]
        command = next(c for c in profile.spec.commands if c.name == "snapshot")
        wanted = set(command.action.signals)  # type: ignore[union-attr]
        assert reports.final == {"samples": len(wanted), "missing": []}
        assert wait_for(lambda: {s.signal for s in r.samples("snapshot")} == wanted)
        by_name = {s.signal: s for s in r.samples("snapshot")}
        assert by_name[LOCKED].value == "LOCKED" and by_name[GEAR].value == "P"
        assert by_name[SPEED].value == 0 and by_name[SPEED].clock_synced
        assert abs(by_name[SPEED].ts_ns - time.time_ns()) < 60 * 10**9  # a receive time, not 0


def test_set_rule_changes_how_often_speed_is_sent(profile: LoadedProfile) -> None:
    window = 1.5
    with rig(profile) as r:
        start = len(r.samples("speed_10hz"))
        time.sleep(window)
        before = len(r.samples("speed_10hz")) - start

        bad = r.run("set_speed_period", {"period_ms": 20})
        assert bad.states == ["rejected"] and bad.final["reason"] == "bad_parameters"
        reports = r.run("set_speed_period", {"period_ms": 1000})
        assert reports.states == ["in_progress", "succeeded"], reports.items
        assert reports.final == {"rule": "speed_10hz", "period_ms": 1000}

        time.sleep(0.2)  # the period already due under the old rate may still go out
        start = len(r.samples("speed_10hz"))
        time.sleep(window)
        after = len(r.samples("speed_10hz")) - start
        assert before >= 5 and after * 3 < before, (before, after)


def test_status_reports_the_pipeline(profile: LoadedProfile) -> None:
    with rig(profile) as r:
        reports = r.run("status")
        assert reports.states == ["in_progress", "succeeded"]
        status = reports.final
        assert status["buses"]["body"]["frames"] > 0 and status["buses"]["powertrain"]["frames"] > 0
        assert "rules" in status and status["clock"]["synced"] is True


# -- unit tests with injected I/O ------------------------------------------------------------

class FakeVehicle:
    """Injected I/O for the executor: a settable clock, live values, a frame log."""

    def __init__(self, profile: LoadedProfile) -> None:
        self.request = profile.databases["body"].get_message_by_name("TCU_RemoteLockRequest")
        self.now = 1000.0
        self.values: dict[str, tuple[SignalValue, float]] = {}
        self.sent: list[tuple[str, can.Message]] = []
        self.emitted: list[Record] = []
        self.reconfigured: list[tuple[str, dict[str, float | int]]] = []
        self.fail_transmit = False
        self.refuse_rule = False
        self.bcm_answers = True
        self.seconds_per_read = 0.0  # how far the clock moves each time live values are read
        self.clock = Clock(monotonic=lambda: self.now, synced=lambda: True)

    def live(self, names: Iterable[str]) -> dict[str, tuple[SignalValue, float]]:
        self.now += self.seconds_per_read
        return {n: self.values[n] for n in names if n in self.values}

    def transmit(self, bus: str, msg: can.Message) -> None:
        if self.fail_transmit:
            raise BusUnavailable("bus body is not open")
        self.sent.append((bus, msg))
        if not self.bcm_answers:
            return
        # The BCM answers at once, 50 ms later by the fake clock.
        decoded = self.request.decode(bytes(msg.data))
        assert isinstance(decoded, Mapping)
        self.values[LOCKED] = ("LOCKED" if str(decoded["TCU_LockRequest"]) == "Lock" else "UNLOCKED",
                               self.now + 0.05)

    def reconfigure(self, rule: str, fields: Mapping[str, float | int]) -> dict[str, float | int]:
        if self.refuse_rule:
            raise ValueError("rule engine says no")
        self.reconfigured.append((rule, dict(fields)))
        return dict(fields)

    def executor(self, profile: LoadedProfile) -> CommandExecutor:
        return CommandExecutor(profile, live=self.live, transmit=self.transmit, emit=self.emitted.extend,
                               status=lambda: {"ok": True}, reconfigure=self.reconfigure, clock=self.clock,
                               poll_s=0.001)


@pytest.fixture
def fake(profile: LoadedProfile) -> FakeVehicle:
    return FakeVehicle(profile)


def test_rate_limit_window_slides(profile: LoadedProfile, fake: FakeVehicle) -> None:
    executor = fake.executor(profile)
    for _ in range(10):
        assert executor.execute("snapshot", {}, "c", Reports()).state == "succeeded"
    fake.now += 30
    rejected = executor.execute("snapshot", {}, "c", Reports())
    assert rejected.state == "rejected" and rejected.detail["retry_after_s"] == pytest.approx(30)
    fake.now += 30.001  # the first ten are now more than 60 s old
    assert executor.execute("snapshot", {}, "c", Reports()).state == "succeeded"


def test_actuation_outside_the_allow_list_is_refused_at_run_time(profile: LoadedProfile, fake: FakeVehicle) -> None:
    # A profile that somehow lost its allow list after loading: defense in depth.
    stripped = dataclasses.replace(profile, spec=profile.spec.model_copy(update={"actuation_allow": []}))
    outcome = fake.executor(stripped).execute("lock_doors", {}, "c", Reports())
    assert outcome.state == "failed" and outcome.detail["reason"] == "actuation_not_allowed"
    assert fake.sent == []


def test_transmit_errors_fail_with_bus_unavailable(profile: LoadedProfile, fake: FakeVehicle) -> None:
    fake.fail_transmit = True
    outcome = fake.executor(profile).execute("lock_doors", {}, "c", Reports())
    assert outcome.state == "failed" and outcome.detail["reason"] == "bus_unavailable"
    assert outcome.detail["frames_sent"] == 0


def test_confirmation_needs_a_value_received_after_the_actuation(profile: LoadedProfile, fake: FakeVehicle) -> None:
    executor = fake.executor(profile)
    fake.values.update({SPEED: (0.0, fake.now), GEAR: ("P", fake.now)})
    outcome = executor.execute("unlock_doors", {}, "c", Reports())
    assert outcome.state == "succeeded" and outcome.detail == {"frames_sent": 3, "observed": "UNLOCKED",
                                                               "after_ms": 50}
    # Already LOCKED before the command, and the BCM silent since: that is no confirmation.
    fake.bcm_answers = False
    fake.values[LOCKED] = ("LOCKED", fake.now - 0.01)
    fake.seconds_per_read = 0.01
    outcome = executor.execute("lock_doors", {}, "c", Reports())
    assert outcome.state == "timed_out" and outcome.detail["observed"] == "LOCKED"
    assert outcome.detail["updated"] is False


def test_counters_advance_per_frame_across_commands_and_wrap(profile: LoadedProfile, fake: FakeVehicle) -> None:
    executor = fake.executor(profile)
    for name in ["lock_doors", "unlock_doors"] * 5:
        fake.values.update({SPEED: (0.0, fake.now), GEAR: ("P", fake.now)})
        assert executor.execute(name, {}, "c", Reports()).state == "succeeded"
    message = profile.databases["body"].get_message_by_name("TCU_RemoteLockRequest")
    counters = [message.decode(bytes(m.data))["TCU_RemoteLockRequest_Counter"]  # type: ignore[call-overload]
                for _, m in fake.sent]
    assert counters == [*range(16), *range(14)]
    assert {bus for bus, _ in fake.sent} == {"body"}
    assert {(m.arbitration_id, m.is_extended_id, m.is_fd, len(m.data)) for _, m in fake.sent} == {
        (REQUEST_ID, False, False, 2)}


def test_bad_parameters_and_unknown_commands_are_rejected(profile: LoadedProfile, fake: FakeVehicle) -> None:
    executor = fake.executor(profile)
    for params in ({"period_ms": 20}, {"period_ms": 50.5}, {"period_ms": "100"}, {}, {"period_ms": 100, "x": 1}):
        reports = Reports()
        outcome = executor.execute("set_speed_period", params, "c", reports)
        assert reports.states == ["rejected"] and outcome.detail["reason"] == "bad_parameters", params
    assert executor.execute("fly", {}, "c", Reports()).detail["reason"] == "unknown_command"
    assert executor.execute("lock_doors", {"force": True}, "c", Reports()).detail["reason"] == "bad_parameters"
    assert fake.reconfigured == [] and fake.sent == []
    assert set(parameter_specs(next(c for c in profile.spec.commands if c.name == "set_speed_period"))) == {
        "period_ms"}


def test_a_rule_change_the_engine_refuses_fails(profile: LoadedProfile, fake: FakeVehicle) -> None:
    fake.refuse_rule = True
    outcome = fake.executor(profile).execute("set_speed_period", {"period_ms": 500}, "c", Reports())
    assert outcome.state == "failed" and outcome.detail["reason"] == "invalid_rule_change"


def test_close_ends_a_command_waiting_for_confirmation(profile: LoadedProfile, fake: FakeVehicle) -> None:
    executor = fake.executor(profile)
    fake.bcm_answers = False
    threading.Timer(0.1, executor.close).start()
    outcome = executor.execute("lock_doors", {}, "c", Reports())  # the fake clock never reaches the timeout
    assert outcome.state == "failed" and outcome.detail["reason"] == "agent_stopping"


def test_rule_engine_reconfigure(profile: LoadedProfile) -> None:
    clock = Clock(monotonic=lambda: 0.0, synced=lambda: True)
    engine = RuleEngine(profile.spec.rules, profile.conditions, clock, start=0.0)
    engine.update(0.01, [(SPEED, 12.0)])
    assert engine.live(SPEED) == (12.0, 0.01) and engine.live(GEAR) is None
    assert engine.reconfigure("speed_10hz", {"period_ms": 1000}) == {"period_ms": 1000}
    engine.tick(0.5)  # the old 100 ms deadline has moved to 1 s
    assert engine.drain() == []
    engine.tick(1.0)
    assert [s.value for s in engine.drain() if isinstance(s, Sample)] == [12.0]
    rule = next(r for r in profile.spec.rules if r.name == "speed_10hz")
    assert isinstance(rule, PeriodicRule) and rule.period_ms == 100  # the profile itself is unchanged
    with pytest.raises(ValueError, match="unknown rule"):
        engine.reconfigure("nope", {"period_ms": 1000})
    with pytest.raises(ValueError, match="cannot be changed"):
        engine.reconfigure("speed_10hz", {"window_ms": 1000})
    with pytest.raises(ValueError, match="invalid value"):
        engine.reconfigure("speed_10hz", {"period_ms": 0})
    assert engine.reconfigure("soc_step", {"deadband": 2.0, "min_interval_ms": 0}) == {
        "deadband": 2.0, "min_interval_ms": 0}
    assert engine.reconfigure("speed_stats", {"window_ms": 5000}) == {"window_ms": 5000}
    assert engine.reconfigure("hard_brake", {"min_interval_ms": 1}) == {"min_interval_ms": 1}


# -- simulator options ------------------------------------------------------------------------

def test_simulated_faults_are_checked() -> None:
    assert parse_faults(["lock-actuator"]) == {"lock_actuator"}
    with pytest.raises(ValueError, match="unknown simulated fault"):
        parse_faults(["door-motor"])


def test_drive_cli_accepts_the_lock_actuator_fault(profile: LoadedProfile) -> None:
    buses = virtual_buses(profile)
    args = ["drive", "--profile", str(PROFILE), "--fault", "lock-actuator", "--duration", "0.3", "--quiet"]
    for name, (interface, channel) in buses.items():
        args += ["--bus", f"{name}={interface}:{channel}"]
    try:
        assert sim_cli.main(args) == 0
    finally:
        structlog.reset_defaults()  # the CLI configures logging for the whole process
