"""Busy-bus traffic for benchmarks, generated offline on a virtual clock.

The simulator's own ECU sources (:class:`simulator.ecu.Ecu`, every message the vehicle sends,
at its cycle time, encoded from the drive cycle) are driven exactly as
:meth:`simulator.engine.Engine.run` drives them -- a heap of deadlines, one
:class:`~simulator.engine.Tick` per wake-up with the looping drive-cycle state -- except that
time is virtual: the clock jumps to the next deadline instead of sleeping. The result is
deterministic: the same profile and duration always give the same frames, and each frame's
``timestamp`` is its virtual send time in seconds from the start.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import can

from agent.profile.loader import LoadedProfile
from simulator.engine import Source, Tick
from simulator.runner import Simulator

NS_PER_S = 1_000_000_000


def generate(profile: LoadedProfile, seconds: float = 30.0) -> list[can.Message]:
    """``seconds`` of every bus of ``profile``, as the simulator would send it, in send order."""
    simulator = Simulator(profile, loop=True)  # builds the ECU sources; opens no bus
    state_fn = simulator.state_function()
    start_ns = 0
    end_ns = start_ns + round(seconds * NS_PER_S)
    heap: list[tuple[int, int, Source]] = []
    for seq, source in enumerate(simulator.ecu.sources):  # the vehicle's traffic, no actuators
        first = source.start(start_ns)
        if first is not None:
            heap.append((first, seq, source))
    heapq.heapify(heap)
    frames: list[can.Message] = []
    while heap and heap[0][0] < end_ns:
        now = heap[0][0]
        tick = Tick(now, (now - start_ns) / NS_PER_S, state_fn)
        timestamp = now / NS_PER_S
        while heap and heap[0][0] <= now:
            _, seq, source = heapq.heappop(heap)
            sent, deadline = source.fire(tick)
            for _bus, frame in sent:
                frame.timestamp = timestamp
                frames.append(frame)
            if deadline is not None:
                heapq.heappush(heap, (deadline, seq, source))
    return frames


def write_candump(frames: list[can.Message], path: str | Path, channel: str = "can0") -> Path:
    """Write ``frames`` as a candump ``-L`` log (what ``can.LogReader`` reads back)."""
    path = Path(path)
    with can.CanutilsLogWriter(path, channel=channel) as writer:
        for frame in frames:
            writer.on_message_received(frame)
    return path
