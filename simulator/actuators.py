"""How the simulated vehicle reacts to what the telematics unit sends: the BCM's central locking.

The body control module listens for the remote lock request -- the message of any simulated
bus that has a ``TCU_LockRequest`` signal (``TCU_RemoteLockRequest`` in the shipped
databases) -- and :data:`REACTION_DELAY_S` (real time) after a ``Lock`` or ``Unlock``
request reports the new central lock state. Every frame of a request counts (the agent
sends each request a few times); ``NoRequest`` and frames that do not decode are ignored
(counted in :class:`LockingStats`).

The reported state overrides the drive cycle's until the cycle itself changes the lock
state (it unlocks and locks at its phases): the cycle's value when the override took
effect is remembered, and the override ends as soon as the cycle's value differs from it.
So a vehicle unlocked remotely while parked stays unlocked until the driver locks it at
the end of the cycle.

Fault ``lock_actuator``: the BCM ignores every request (counted as ``ignored``), so the
lock state never follows a command and its confirmation fails.

:class:`CentralLocking` is an engine source: it drains the bus's receive queue every
:data:`POLL_NS` in the engine thread, so no extra thread touches the bus.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import can
import structlog
from cantools.database.can import Message

from agent.profile.loader import LoadedProfile
from simulator.engine import Outgoing, Tick, next_slot
from simulator.scenario import DRIVER_DOOR_LOCKED, TRUNK_LOCKED, Value

log = structlog.get_logger(__name__)

LOCK_ACTUATOR = "lock_actuator"
SIMULATED_FAULTS = (LOCK_ACTUATOR,)
LOCK_REQUEST_SIGNAL = "TCU_LockRequest"
REQUESTED_STATE = {"Lock": "LOCKED", "Unlock": "UNLOCKED"}
LOCK_STATE_SIGNALS = (DRIVER_DOOR_LOCKED, TRUNK_LOCKED)  # central locking: every lock at once
REACTION_DELAY_S = 0.2  # a BCM drives the lock motors for ~150-300 ms before it reports
POLL_NS = 10_000_000
MAX_FRAMES_PER_POLL = 256


def parse_faults(faults: Iterable[str]) -> frozenset[str]:
    """Simulated ECU faults by name (``lock-actuator`` or ``lock_actuator``)."""
    names = frozenset(f.strip().replace("-", "_") for f in faults if f.strip())
    unknown = sorted(names - set(SIMULATED_FAULTS))
    if unknown:
        raise ValueError(f"unknown simulated fault(s) {', '.join(unknown)}: use "
                         f"{', '.join(f.replace('_', '-') for f in SIMULATED_FAULTS)}")
    return names


@dataclass
class LockingStats:
    requests: int = 0  # Lock/Unlock frames received
    applied: int = 0  # requests that changed what the BCM reports
    ignored: int = 0  # requests dropped by the lock_actuator fault
    undecodable: int = 0  # frames with the request id that do not decode


def find_lock_request(profile: LoadedProfile, bus_names: Iterable[str]) -> tuple[str, Message] | None:
    """(bus, message) carrying the remote lock request on one of ``bus_names``, if any."""
    for bus in bus_names:
        for message in profile.databases[bus].messages:
            if any(s.name == LOCK_REQUEST_SIGNAL for s in message.signals):
                return bus, message
    return None


class CentralLocking:
    """The BCM's reaction to remote lock requests, as an engine source and a state overlay."""

    def __init__(self, profile: LoadedProfile, bus_names: Iterable[str], buses: Mapping[str, can.BusABC],
                 scenario_state: Callable[[float], Mapping[str, Value]], *,
                 faults: Iterable[str] = (), delay_s: float = REACTION_DELAY_S) -> None:
        """``buses`` is the runner's (filled when it starts); ``scenario_state`` the cycle without overrides."""
        self.request = find_lock_request(profile, bus_names)
        self.buses = buses
        self.scenario_state = scenario_state
        self.faulty = LOCK_ACTUATOR in parse_faults(faults)
        self.delay_ns = int(delay_s * 1e9)
        self.stats = LockingStats()
        self._pending: deque[tuple[int, str]] = deque()  # (due monotonic ns, LOCKED/UNLOCKED)
        self._lock = threading.Lock()
        # (reported state, cycle state it overrides, scenario time it took effect)
        self._override: tuple[str, Value, float] | None = None
        self._base = 0
        self._k = 0

    @property
    def active(self) -> bool:
        return self.request is not None

    # -- engine source ---------------------------------------------------------------------
    def start(self, start_ns: int) -> int | None:
        if self.request is None:
            return None
        bus_name, message = self.request
        if bus_name not in self.buses:
            return None  # no bus to listen on (frames generated offline)
        extended = message.is_extended_frame
        self.buses[bus_name].set_filters([{"can_id": message.frame_id, "extended": extended,
                                           "can_mask": 0x1FFFFFFF if extended else 0x7FF}])
        self._base, self._k = start_ns, 0
        return start_ns + POLL_NS

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int | None]:
        assert self.request is not None
        bus_name, message = self.request
        bus = self.buses[bus_name]
        for _ in range(MAX_FRAMES_PER_POLL):
            frame = bus.recv(timeout=0)
            if frame is None:
                break
            self._receive(message, frame, tick.now_ns)
        while self._pending and self._pending[0][0] <= tick.now_ns:
            _, target = self._pending.popleft()
            self._apply(target, tick.scenario_time)
        self._k, deadline, _ = next_slot(self._base, POLL_NS, self._k, tick.now_ns)
        return [], deadline

    def _receive(self, message: Message, frame: can.Message, now_ns: int) -> None:
        if frame.arbitration_id != message.frame_id or frame.is_extended_id != message.is_extended_frame:
            return
        try:
            decoded = message.decode(bytes(frame.data), decode_choices=True)
            request = str(decoded[LOCK_REQUEST_SIGNAL]) if isinstance(decoded, Mapping) else ""
        except Exception as exc:  # cantools raises several types on a bad payload
            self.stats.undecodable += 1
            log.warning("lock_request_undecodable", data=bytes(frame.data).hex(), error=str(exc))
            return
        target = REQUESTED_STATE.get(request)
        if target is None:
            return
        self.stats.requests += 1
        if self.faulty:
            self.stats.ignored += 1
            log.info("lock_request_ignored", request=request, fault=LOCK_ACTUATOR)
            return
        self._pending.append((now_ns + self.delay_ns, target))

    def _apply(self, target: str, scenario_time: float) -> None:
        base = self.scenario_state(scenario_time).get(DRIVER_DOOR_LOCKED)
        if base is None:
            return
        with self._lock:
            current = self._override[0] if self._override is not None else base
            self._override = (target, base, scenario_time)
        if current != target:
            self.stats.applied += 1
            log.info("central_locking", state=target, scenario_time=round(scenario_time, 3))

    # -- state overlay ---------------------------------------------------------------------
    def overlay(self, scenario_time: float, state: dict[str, Value]) -> dict[str, Value]:
        """``state`` (the cycle's at ``scenario_time``) with the lock state the BCM reports."""
        with self._lock:
            override = self._override
            if override is None:
                return state
            target, base, since = override
            if scenario_time < since:
                return state
            if state.get(DRIVER_DOOR_LOCKED) != base:
                self._override = None  # the cycle locked or unlocked: it takes over again
                return state
        for name in LOCK_STATE_SIGNALS:
            if name in state:
                state[name] = target
        return state


__all__ = ["LOCK_ACTUATOR", "REACTION_DELAY_S", "SIMULATED_FAULTS", "CentralLocking", "LockingStats",
           "find_lock_request", "parse_faults"]
