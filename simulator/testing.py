"""Run the simulator inside a pytest test, on python-can ``virtual`` buses.

    with run_simulator("firmware_profiles/ev_sedan/ev_sedan.yaml",
                       buses=virtual_buses("firmware_profiles/ev_sedan/ev_sedan.yaml"),
                       time_scale=10) as sim:
        sim.wait_until(sim.cycle.hard_brake_time + 1)

Open the receiving ``can.Bus(interface="virtual", channel=...)`` *before* the simulator
starts: a virtual bus only queues frames sent after it was created.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.profile.loader import LoadedProfile
from simulator.inject import FaultConfig, parse_kinds
from simulator.runner import BusOverrides, Simulator, as_profile
from simulator.scenario import DriveCycle, ScenarioConfig


def virtual_buses(profile: LoadedProfile | str | Path, prefix: str | None = None
                  ) -> dict[str, tuple[str, str]]:
    """Bus name -> ("virtual", "<prefix>-<bus name>"), a fresh prefix unless one is given."""
    prefix = prefix or f"sim-{uuid.uuid4().hex[:8]}"
    return {b.name: ("virtual", f"{prefix}-{b.name}") for b in as_profile(profile).spec.buses}


def fault_config(inject: FaultConfig | str | Iterable[str] | None,
                 rate_hz: float = 5.0) -> FaultConfig | None:
    if inject is None or isinstance(inject, FaultConfig):
        return inject
    kinds = parse_kinds(inject if isinstance(inject, str) else ",".join(inject))
    return FaultConfig(kinds=kinds, rate_hz=rate_hz)


@contextmanager
def run_simulator(profile_path: LoadedProfile | str | Path, buses: BusOverrides | None = None,
                  scenario: DriveCycle | ScenarioConfig | None = None, time_scale: float = 1.0,
                  inject: FaultConfig | str | Iterable[str] | None = None, *,
                  inject_rate: float = 5.0, loop: bool = False) -> Iterator[Simulator]:
    """The drive cycle running in a background thread; stopped and closed on exit.

    ``buses`` defaults to fresh virtual channels (see :func:`virtual_buses`); ``inject`` is a
    :class:`FaultConfig`, or fault kinds (``"error-frames,unknown-ids"`` or a list) sent at
    ``inject_rate`` Hz.
    """
    profile = as_profile(profile_path)
    simulator = Simulator(profile, buses=buses if buses is not None else virtual_buses(profile),
                          scenario=scenario, time_scale=time_scale, loop=loop,
                          inject=fault_config(inject, inject_rate))
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


__all__ = ["fault_config", "run_simulator", "virtual_buses"]
