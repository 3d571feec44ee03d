"""Run the simulated vehicle on real python-can buses.

:class:`BusRunner` opens one python-can bus per profile bus (interface and channel from the
profile, or overridden per bus name), runs an :class:`~simulator.engine.Engine` in a thread
and closes everything on exit. :class:`Simulator` is the drive-cycle runner; load mode and
replay live in :mod:`simulator.load` and :mod:`simulator.replay`.

Timestamps: ``start_monotonic_ns`` and ``start_wall_ns`` are taken together when the engine
starts; ``scenario_time(msg.timestamp)`` turns a received frame's wall-clock timestamp into
scenario time (``(t - start) * time_scale``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import can
import structlog

from agent.errors import BusUnavailable
from agent.profile.loader import LoadedProfile, load_profile
from simulator.actuators import CentralLocking
from simulator.ecu import TELEMATICS_NODES, Ecu
from simulator.engine import Engine, Source, StateFunction, open_bus
from simulator.inject import FaultConfig, FaultInjector
from simulator.scenario import DriveCycle, Phase, ScenarioConfig, Value

log = structlog.get_logger(__name__)

BusOverrides = Mapping[str, tuple[str, str]]  # bus name -> (python-can interface, channel)


def as_profile(profile: LoadedProfile | str | Path) -> LoadedProfile:
    return profile if isinstance(profile, LoadedProfile) else load_profile(profile)


class BusRunner(ABC):
    """Opens the buses, runs an engine over them, and closes them again."""

    def __init__(self, profile: LoadedProfile | str | Path, *, buses: BusOverrides | None = None,
                 only: Iterable[str] | None = None, time_scale: float = 1.0,
                 inject: FaultConfig | None = None) -> None:
        self.profile = as_profile(profile)
        known = [b.name for b in self.profile.spec.buses]
        self.overrides = dict(buses or {})
        names = list(only) if only is not None else known
        unknown = sorted((set(self.overrides) | set(names)) - set(known))
        if unknown:
            raise ValueError(f"unknown bus name(s) {', '.join(unknown)}: "
                             f"{self.profile.path.name} has {', '.join(known)}")
        self.bus_names = [n for n in known if n in names]
        if time_scale <= 0:
            raise ValueError(f"time scale must be > 0, got {time_scale}")
        self.time_scale = time_scale
        self.inject = inject
        self.injector: FaultInjector | None = (
            FaultInjector(self.profile, inject, self.bus_names) if inject else None)
        self.buses: dict[str, can.BusABC] = {}
        self.engine: Engine | None = None

    # -- what subclasses provide ---------------------------------------------------------

    @abstractmethod
    def sources(self) -> list[Source]:
        """What this runner sends (fresh sources, called once per start)."""

    def state_function(self) -> StateFunction | None:
        return None

    # -- lifecycle ------------------------------------------------------------------------

    def bus_endpoint(self, name: str) -> tuple[str, str]:
        spec = next(b for b in self.profile.spec.buses if b.name == name)
        return self.overrides.get(name, (spec.interface, spec.channel))

    def start(self) -> Self:
        if self.engine is not None:
            raise RuntimeError("already started")
        sources = self.sources()
        if self.injector is not None:
            sources.append(self.injector)
        try:
            for spec in self.profile.spec.buses:
                if spec.name not in self.bus_names:
                    continue
                interface, channel = self.bus_endpoint(spec.name)
                try:
                    self.buses[spec.name] = open_bus(interface, channel, bitrate=spec.bitrate,
                                                     fd=spec.fd, data_bitrate=spec.data_bitrate)
                except (can.CanError, OSError, ValueError, ImportError) as exc:
                    raise BusUnavailable(f"cannot open bus {spec.name} ({interface}:{channel}): "
                                         f"{exc}") from exc
            self.engine = Engine(self.buses, sources, time_scale=self.time_scale,
                                 state_fn=self.state_function())
            self.engine.start()
        except BaseException:
            self._close_buses()
            raise
        log.info("simulator_started", mode=type(self).__name__,
                 buses={n: ":".join(self.bus_endpoint(n)) for n in self.buses})
        return self

    def stop(self) -> None:
        try:
            if self.engine is not None:
                self.engine.stop()
        finally:
            self._close_buses()

    def _close_buses(self) -> None:
        for bus in self.buses.values():
            try:
                bus.shutdown()
            except (can.CanError, OSError) as exc:
                log.warning("bus_shutdown_failed", error=str(exc))
        self.buses.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- observation ----------------------------------------------------------------------

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("not started")
        return self.engine

    @property
    def frames_sent(self) -> dict[str, int]:
        return dict(self._engine().frames_sent) if self.engine else dict.fromkeys(self.bus_names, 0)

    @property
    def send_errors(self) -> dict[str, int]:
        return dict(self._engine().send_errors) if self.engine else dict.fromkeys(self.bus_names, 0)

    @property
    def start_monotonic_ns(self) -> int:
        return self._engine().start_monotonic_ns

    @property
    def start_wall_ns(self) -> int:
        return self._engine().start_wall_ns

    def elapsed(self) -> float:
        return self._engine().elapsed()

    def scenario_time(self, wall_time_s: float | None = None) -> float:
        """Scenario time now, or of a wall-clock timestamp such as ``can.Message.timestamp``."""
        engine = self._engine()
        if wall_time_s is None:
            return engine.scenario_time(time.monotonic_ns())
        return engine.scenario_time_of_wall(wall_time_s)

    def wall_time(self, scenario_time: float) -> float:
        """Wall-clock time (s since the epoch) at which the scenario reaches ``scenario_time``."""
        return self.start_wall_ns / 1e9 + scenario_time / self.time_scale

    @property
    def failed(self) -> bool:
        """The engine thread died (the error is raised by :meth:`stop`)."""
        return self.engine is not None and self.engine.failed

    def request_stop(self) -> None:
        if self.engine is not None:
            self.engine.request_stop()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None,
                 poll: float = 0.02) -> bool:
        """Poll ``predicate`` until it holds (True), or timeout, stop or the engine ends."""
        engine = self._engine()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            if engine.exhausted.is_set():
                return predicate()
            wait = poll if deadline is None else min(poll, deadline - time.monotonic())
            if wait <= 0 or engine.sleep(wait):
                return predicate()
        return True

    def status_line(self) -> str:
        sent = self.frames_sent
        errors = self.send_errors
        parts = [f"{name}: {count} frames" + (f" ({errors[name]} send errors)" if errors[name]
                                               else "") for name, count in sent.items()]
        if self.injector is not None:
            parts.append("faults " + " ".join(f"{k}={n}" for k, n in self.injector.counts.items()))
        return f"[{self.elapsed():7.1f}s] " + ", ".join(parts)


class Simulator(BusRunner):
    """The drive cycle on every bus of a profile, with optional fault injection.

    ``scenario``: a :class:`DriveCycle` is used as is; a :class:`ScenarioConfig` gives phase
    durations and starting conditions while the powertrain and battery-cell grid follow the
    profile's signals (:meth:`DriveCycle.for_signals`); None is the default cycle for the
    profile. Frames keep their real cycle times; ``time_scale`` only speeds the scenario up.

    The body control module reacts to remote lock requests from the agent
    (:mod:`simulator.actuators`); ``faults={"lock_actuator"}`` makes it ignore them.
    """

    def __init__(self, profile: LoadedProfile | str | Path, *, buses: BusOverrides | None = None,
                 scenario: DriveCycle | ScenarioConfig | None = None, time_scale: float = 1.0,
                 loop: bool = False, inject: FaultConfig | None = None,
                 only: Iterable[str] | None = None,
                 telematics_nodes: Iterable[str] = TELEMATICS_NODES,
                 faults: Iterable[str] = ()) -> None:
        super().__init__(profile, buses=buses, only=only, time_scale=time_scale, inject=inject)
        if isinstance(scenario, DriveCycle):
            self.cycle = scenario
        else:
            self.cycle = DriveCycle.for_signals(self.profile.catalog, scenario)
        self.loop = loop
        self.ecu = Ecu(self.profile, self.bus_names, telematics_nodes=telematics_nodes)
        self.locking = CentralLocking(self.profile, self.bus_names, self.buses, self._cycle_state,
                                      faults=faults)
        missing = sorted(self.ecu.canonical_names() - self.cycle.signal_names())
        if missing:
            log.warning("scenario_does_not_drive", signals=missing,
                        hint="these signals keep their database start value")
        unsent = sorted(name for name, entry in self.profile.catalog.items()
                        if (entry.bus, entry.message.name) in self.ecu.not_sent)
        if unsent:
            log.warning("catalog_signals_not_simulated", signals=unsent,
                        hint="their messages are sent by the telematics unit or on request")

    def sources(self) -> list[Source]:
        sources: list[Source] = list(self.ecu.sources)
        if self.locking.active:
            sources.append(self.locking)
        return sources

    def _cycle_state(self, t: float) -> dict[str, Value]:
        return self.cycle.state_at(t, loop=self.loop)

    def state_function(self) -> StateFunction:
        cycle_state, overlay = self._cycle_state, self.locking.overlay
        return lambda t: overlay(t, cycle_state(t))

    def state(self, scenario_time: float | None = None) -> dict[str, Value]:
        """What the ECUs send at ``scenario_time`` (now): the cycle, with the BCM's lock state."""
        t = self.scenario_time() if scenario_time is None else scenario_time
        return self.locking.overlay(t, self._cycle_state(t))

    def phase(self) -> Phase:
        return self.cycle.phase_at(self.scenario_time(), loop=self.loop)

    @property
    def finished(self) -> bool:
        """A single (non-looping) cycle has reached its end."""
        return not self.loop and self.scenario_time() >= self.cycle.duration

    def wait_until(self, scenario_time: float, timeout: float | None = None) -> bool:
        """Sleep until the scenario reaches ``scenario_time``; False on timeout or stop."""
        return self.wait_for(lambda: self.scenario_time() >= scenario_time, timeout,
                             poll=0.01)

    def wait_finished(self, timeout: float | None = None) -> bool:
        return self.wait_until(self.cycle.duration, timeout)

    def status_line(self) -> str:
        t = self.scenario_time()
        return (f"{super().status_line()} | scenario {t:6.1f}s "
                f"{self.cycle.phase_at(t, loop=self.loop).name}")


__all__ = ["BusOverrides", "BusRunner", "Simulator", "as_profile"]
