"""Vehicle simulator: the drive cycle, log replay, bus load and fault injection on CAN buses.

It loads profiles and databases through the agent's own loader, so both ends agree on every
message. Entry points: :class:`~simulator.runner.Simulator`,
:func:`~simulator.testing.run_simulator` (pytest), and the ``telematics-sim`` command.
"""

from __future__ import annotations

from simulator.inject import FAULT_KINDS, FaultConfig
from simulator.runner import BusRunner, Simulator
from simulator.scenario import DriveCycle, Phase, ScenarioConfig

__all__ = ["FAULT_KINDS", "BusRunner", "DriveCycle", "FaultConfig", "Phase", "ScenarioConfig",
           "Simulator"]
