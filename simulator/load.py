"""Load mode: keep a bus busy for a given share of its bitrate with the profile's own frames.

Bus load is the share of time the wire carries frames. Each frame's duration is computed
from its real bit count: for classic CAN exactly (header, data and CRC-15, with the stuff
bits that this very payload needs, plus CRC delimiter, ACK, EOF and intermission); for CAN FD
as an estimate (arbitration at the nominal bitrate, data phase at the data bitrate when the
bit-rate switch is set, fixed stuff bits, and 10 % dynamic stuffing).

The generator keeps a budget: after ``t`` seconds it may have used ``t * percent / 100``
seconds of bus time. It sends the profile's messages in turn (encoded from the drive cycle,
so the frames decode), and never bursts more than ``burst_s`` worth of catch-up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import can

from agent.profile.loader import LoadedProfile
from simulator.ecu import TELEMATICS_NODES, MessageEncoder, simulated_messages
from simulator.engine import Outgoing, Source, StateFunction, Tick
from simulator.inject import FaultConfig
from simulator.runner import BusOverrides, BusRunner
from simulator.scenario import DriveCycle

_CRC15_POLY = 0x4599
_TAIL_BITS = 1 + 2 + 7 + 3  # CRC delimiter, ACK slot + delimiter, EOF, intermission
_MIN_TICK_NS = 500_000


def _bits(value: int, width: int) -> list[int]:
    return [(value >> i) & 1 for i in range(width - 1, -1, -1)]


def crc15(bits: Iterable[int]) -> int:
    crc = 0
    for bit in bits:
        feedback = bit ^ ((crc >> 14) & 1)
        crc = (crc << 1) & 0x7FFF
        if feedback:
            crc ^= _CRC15_POLY
    return crc


def stuff_bit_count(bits: Iterable[int]) -> int:
    """Bits a transmitter inserts: one of opposite polarity after five equal bits."""
    count = run = 0
    last = -1
    for bit in bits:
        if bit == last:
            run += 1
        else:
            last, run = bit, 1
        if run == 5:
            count += 1
            last, run = 1 - bit, 1  # the stuff bit starts the next run
    return count


def classic_frame_bits(arbitration_id: int, is_extended: bool, data: bytes,
                       is_remote: bool = False, dlc: int | None = None) -> int:
    """Exact length in bits of a classic CAN data or remote frame, intermission included."""
    dlc = len(data) if dlc is None else dlc
    rtr = int(is_remote)
    if is_extended:
        header = [0, *_bits(arbitration_id >> 18, 11), 1, 1,
                  *_bits(arbitration_id & 0x3FFFF, 18), rtr, 0, 0]
    else:
        header = [0, *_bits(arbitration_id, 11), rtr, 0, 0]
    header += _bits(dlc, 4)
    if not is_remote:
        for byte in data:
            header += _bits(byte, 8)
    stuffed = header + _bits(crc15(header), 15)
    return len(stuffed) + stuff_bit_count(stuffed) + _TAIL_BITS


def fd_frame_time(is_extended: bool, length: int, bitrate: int, data_bitrate: int,
                  bitrate_switch: bool = True) -> float:
    """Estimated seconds on the wire of a CAN FD frame."""
    arbitration = 1 + 11 + 1 + 1 + 1 + 1 + 1  # SOF, id, RRS, IDE, FDF, res, BRS
    if is_extended:
        arbitration += 18 + 1  # id extension, SRR
    crc_bits = 17 if length <= 16 else 21
    data_phase = 1 + 4 + 8 * length  # ESI, DLC, data
    dynamic_stuffing = 0.1 * (arbitration + data_phase)
    data_phase += 4 + crc_bits + (crc_bits + 4) // 4 + 1  # stuff count, CRC, fixed stuff bits
    fast = data_bitrate if bitrate_switch else bitrate
    return (arbitration + _TAIL_BITS) / bitrate + (data_phase + dynamic_stuffing) / fast


def frame_time(frame: can.Message, bitrate: int, data_bitrate: int | None = None) -> float:
    """Seconds the frame occupies the bus."""
    if frame.is_fd:
        return fd_frame_time(frame.is_extended_id, len(frame.data), bitrate,
                             data_bitrate or bitrate, frame.bitrate_switch)
    return classic_frame_bits(frame.arbitration_id, frame.is_extended_id, bytes(frame.data),
                              frame.is_remote_frame, frame.dlc) / bitrate


class LoadGenerator:
    """Engine source filling one bus to ``percent`` of its capacity."""

    def __init__(self, profile: LoadedProfile, bus: str, percent: float, *,
                 burst_s: float = 0.02,
                 telematics_nodes: Iterable[str] = TELEMATICS_NODES) -> None:
        if not 0 < percent <= 100:
            raise ValueError(f"load percent must be in (0, 100], got {percent}")
        spec = next((b for b in profile.spec.buses if b.name == bus), None)
        if spec is None:
            raise ValueError(f"unknown bus {bus!r}")
        self.bus = bus
        self.share = percent / 100.0
        self.bitrate = spec.bitrate
        self.data_bitrate = spec.data_bitrate or spec.bitrate
        self.burst_s = burst_s
        canonical: dict[int, dict[str, str]] = {}
        for name, entry in profile.catalog.items():
            if entry.bus == bus:
                canonical.setdefault(entry.message.frame_id, {})[entry.signal.name] = name
        self.encoders = [MessageEncoder(bus, m, canonical.get(m.frame_id, {}), bus_fd=spec.fd)
                         for m in simulated_messages(profile, bus, telematics_nodes)]
        if not self.encoders:
            raise ValueError(f"bus {bus!r} has no messages the vehicle sends")
        self.frames = 0
        self.busy_s = 0.0  # bus time used so far
        self.shortfall_s = 0.0  # bus time given up because the sender fell behind
        self._turn = itertools.cycle(self.encoders)
        self._start_ns = 0

    def start(self, start_ns: int) -> int:
        self._start_ns = start_ns
        self.busy_s = self.shortfall_s = 0.0
        return start_ns

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int]:
        elapsed = (tick.now_ns - self._start_ns) / 1e9
        allowed = elapsed * self.share
        if allowed - self.busy_s > self.burst_s * self.share:
            behind = allowed - self.busy_s - self.burst_s * self.share
            self.shortfall_s += behind
            self.busy_s += behind
        frames: list[Outgoing] = []
        while self.busy_s < allowed:
            made = next(self._turn).frames(tick.state)
            if not made:  # an unencodable message (counted by its encoder)
                self.busy_s += 1.0 / self.bitrate
                continue
            self.busy_s += frame_time(made[0][1], self.bitrate, self.data_bitrate)
            frames.extend(made)
        self.frames += len(frames)
        due = self._start_ns + int(self.busy_s / self.share * 1e9)
        return frames, max(due, tick.now_ns + _MIN_TICK_NS)

    def achieved_percent(self, elapsed_s: float) -> float:
        return 100.0 * self.busy_s / elapsed_s if elapsed_s > 0 else 0.0


class LoadRunner(BusRunner):
    """Load mode on one or more buses of a profile, with optional fault injection."""

    def __init__(self, profile: LoadedProfile | str | Path, percent: float, *,
                 buses: BusOverrides | None = None, only: Iterable[str] | None = None,
                 inject: FaultConfig | None = None, burst_s: float = 0.02,
                 telematics_nodes: Iterable[str] = TELEMATICS_NODES) -> None:
        super().__init__(profile, buses=buses, only=only, inject=inject)
        self.percent = percent
        self.cycle = DriveCycle.for_signals(self.profile.catalog)
        self.generators = [LoadGenerator(self.profile, name, percent, burst_s=burst_s,
                                         telematics_nodes=telematics_nodes)
                           for name in self.bus_names]

    def sources(self) -> list[Source]:
        return list(self.generators)

    def state_function(self) -> StateFunction:
        cycle = self.cycle
        return lambda t: cycle.state_at(t, loop=True)

    def status_line(self) -> str:
        elapsed = self.elapsed()
        loads = ", ".join(f"{g.bus} {g.achieved_percent(elapsed):.1f}%" for g in self.generators)
        return f"{super().status_line()} | load {loads} (target {self.percent:g}%)"


__all__ = ["LoadGenerator", "LoadRunner", "classic_frame_bits", "crc15", "fd_frame_time",
           "frame_time", "stuff_bit_count"]
