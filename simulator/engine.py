"""Send frames from several sources onto python-can buses, each at its own deadlines.

A *source* (the ECU's messages, the fault injector, the load generator, a log replay) says
when it next wants to send; the engine sleeps on a monotonic clock until the earliest
deadline, lets every due source fire, and sends what they return. Sources keep their own
deadlines as ``start + k * period`` so rounding and scheduling jitter never accumulate.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import can
import structlog

from simulator.scenario import Value

log = structlog.get_logger(__name__)

Outgoing = tuple[str, can.Message]  # (profile bus name, frame)
StateFunction = Callable[[float], Mapping[str, Value]]
_NO_STATE: Mapping[str, Value] = {}


class Tick:
    """One wake-up of the engine: the time, and the scenario state computed at most once."""

    __slots__ = ("_state", "_state_fn", "now_ns", "scenario_time")

    def __init__(self, now_ns: int, scenario_time: float, state_fn: StateFunction | None) -> None:
        self.now_ns = now_ns
        self.scenario_time = scenario_time
        self._state_fn = state_fn
        self._state: Mapping[str, Value] | None = None

    @property
    def state(self) -> Mapping[str, Value]:
        if self._state is None:
            self._state = self._state_fn(self.scenario_time) if self._state_fn else _NO_STATE
        return self._state


class Source(Protocol):
    def start(self, start_ns: int) -> int | None:
        """First deadline (monotonic ns), or None when there is nothing to send."""

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int | None]:
        """Frames to send now, and the next deadline (None: this source is done)."""


def next_slot(base_ns: int, period_ns: int, k: int, now_ns: int) -> tuple[int, int, int]:
    """Slot after ``k`` of the grid ``base + k * period``, skipping slots already in the past.

    Returns (next k, its deadline, number of slots skipped). A sender that fell more than a
    period behind (a stalled process) resumes on the grid instead of sending a burst.
    """
    k += 1
    deadline = base_ns + k * period_ns
    skipped = 0
    if deadline <= now_ns:
        target = (now_ns - base_ns) // period_ns + 1
        skipped = target - k
        k = target
        deadline = base_ns + k * period_ns
    return k, deadline, skipped


class Engine:
    """Runs sources against buses, in a background thread or in the caller's."""

    def __init__(self, buses: Mapping[str, can.BusABC], sources: Sequence[Source], *,
                 time_scale: float = 1.0, state_fn: StateFunction | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.buses = dict(buses)
        self.sources = list(sources)
        self.time_scale = time_scale
        self._state_fn = state_fn
        self._clock = clock
        self.frames_sent: dict[str, int] = dict.fromkeys(self.buses, 0)
        self.send_errors: dict[str, int] = dict.fromkeys(self.buses, 0)
        self.start_monotonic_ns = 0
        self.start_wall_ns = 0
        self.started = threading.Event()
        self.exhausted = threading.Event()  # every source said it is done
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- time mapping -------------------------------------------------------------------

    def scenario_time(self, monotonic_ns: int) -> float:
        return (monotonic_ns - self.start_monotonic_ns) / 1e9 * self.time_scale

    def scenario_time_of_wall(self, wall_time_s: float) -> float:
        """Scenario time of a wall-clock timestamp (e.g. ``can.Message.timestamp``)."""
        return (wall_time_s - self.start_wall_ns / 1e9) * self.time_scale

    def elapsed(self) -> float:
        """Real seconds since the engine started."""
        return (self._clock() - self.start_monotonic_ns) / 1e9 if self.started.is_set() else 0.0

    # -- control --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run_catching, name="sim-engine", daemon=True)
        self._thread.start()
        self.started.wait()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("simulator engine failed") from error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def request_stop(self) -> None:
        self._stop.set()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop is requested."""
        return self._stop.wait(max(0.0, seconds))

    def run(self) -> None:
        """Run in the calling thread until every source is done or stop is requested."""
        self.start_monotonic_ns = self._clock()
        self.start_wall_ns = time.time_ns()
        heap: list[tuple[int, int, Source]] = []
        for seq, source in enumerate(self.sources):
            first = source.start(self.start_monotonic_ns)
            if first is not None:
                heap.append((first, seq, source))
        heapq.heapify(heap)
        self.started.set()
        while heap and not self._stop.is_set():
            now = self._clock()
            if heap[0][0] > now:
                self._stop.wait((heap[0][0] - now) / 1e9)
                continue
            tick = Tick(now, self.scenario_time(now), self._state_fn)
            while heap and heap[0][0] <= now:
                _, seq, source = heapq.heappop(heap)
                frames, deadline = source.fire(tick)
                for bus_name, frame in frames:
                    self._send(bus_name, frame)
                if deadline is not None:
                    heapq.heappush(heap, (deadline, seq, source))
        if not heap:
            self.exhausted.set()

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported to the caller by stop()
            log.error("engine_failed", error=repr(exc))
            self._error = exc
            self.started.set()
            self.exhausted.set()

    def _send(self, bus_name: str, frame: can.Message) -> None:
        frame.timestamp = time.time()
        try:
            self.buses[bus_name].send(frame)
        except can.CanError as exc:
            # A full transmit queue (ENOBUFS) or a bus-off controller: count and keep going.
            errors = self.send_errors[bus_name] = self.send_errors[bus_name] + 1
            if errors == 1 or errors % 1000 == 0:
                log.warning("send_failed", bus=bus_name, frame_id=hex(frame.arbitration_id),
                            error=str(exc), errors=errors)
        else:
            self.frames_sent[bus_name] += 1


def open_bus(interface: str, channel: str, *, bitrate: int | None = None, fd: bool = False,
             data_bitrate: int | None = None) -> can.BusABC:
    """Open one python-can bus; CAN FD and bitrates only where the interface needs them."""
    kwargs: dict[str, Any] = {}
    if interface != "virtual":
        if bitrate is not None and interface not in ("socketcan",):
            kwargs["bitrate"] = bitrate
        if fd:
            kwargs["fd"] = True
            if data_bitrate is not None and interface not in ("socketcan",):
                kwargs["data_bitrate"] = data_bitrate
    else:
        kwargs["protocol"] = can.CanProtocol.CAN_FD if fd else can.CanProtocol.CAN_20
    return can.Bus(interface=interface, channel=channel, **kwargs)


__all__ = ["Engine", "Outgoing", "Source", "StateFunction", "Tick", "next_slot", "open_bus"]
