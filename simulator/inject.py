"""Fault injection: frames a real bus produces now and then and the agent must survive.

* ``error-frames``: python-can error frames (``is_error_frame=True``; the id carries the
  SocketCAN error class, e.g. 0x004 controller / 0x008 protocol violation);
* ``unknown-ids``: ids that no database of the profile defines, standard and extended in turn;
* ``wrong-length``: a known id with a shorter (or, where the bus allows, longer) payload than
  its database says.

Faults go out in turn -- kind after kind, then bus after bus -- at ``rate_hz`` in total, so a
short run already contains every kind on every bus.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import can

from agent.profile.loader import LoadedProfile
from simulator.ecu import simulated_messages
from simulator.engine import Outgoing, Tick, next_slot

FAULT_KINDS = ("error-frames", "unknown-ids", "wrong-length")
CLASSIC_LENGTHS = tuple(range(9))
FD_LENGTHS = (*range(9), 12, 16, 20, 24, 32, 48, 64)
# SocketCAN error classes (linux/can/error.h) with a matching detail byte.
_ERROR_FRAMES = (
    (0x004, bytes([0, 0x04, 0, 0, 0, 0, 0, 0])),  # CAN_ERR_CRTL: RX error warning
    (0x008, bytes([0, 0, 0x02, 0x08, 0, 0, 0, 0])),  # CAN_ERR_PROT: form error in CRC sequence
)


def parse_kinds(text: str) -> tuple[str, ...]:
    """``"error-frames,unknown-ids"`` -> kinds; ``"all"`` -> every kind."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if kinds == ("all",):
        return FAULT_KINDS
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown) or '(none given)'}: "
                         f"use {', '.join(FAULT_KINDS)} or all")
    return kinds


@dataclass(frozen=True)
class FaultConfig:
    kinds: tuple[str, ...] = FAULT_KINDS
    rate_hz: float = 2.0
    buses: tuple[str, ...] | None = None  # None: every bus the simulator drives

    def __post_init__(self) -> None:
        if not 0 < self.rate_hz <= 10_000:
            raise ValueError(f"inject rate must be in (0, 10000] Hz, got {self.rate_hz}")
        parse_kinds(",".join(self.kinds))


def unknown_ids(profile: LoadedProfile, count: int = 4) -> tuple[list[int], list[int]]:
    """Standard and extended ids that no database of the profile defines.

    Standard ids start below 0x700, clear of OBD-II diagnostics (0x7DF-0x7EF) and of the
    0x7F0-0x7FF range classic CAN forbids.
    """
    known = {m.frame_id for db in profile.databases.values() for m in db.messages}
    standard = (i for i in range(0x6FF, 0, -1) if i not in known)
    extended = (i for i in range(0x1FFFF0FF, 0x800, -1) if i not in known)
    return list(itertools.islice(standard, count)), list(itertools.islice(extended, count))


def wrong_length(expected: int, fd: bool, longer: bool) -> int:
    """A valid payload length different from ``expected``: the next shorter or longer one."""
    lengths = FD_LENGTHS if fd else CLASSIC_LENGTHS
    shorter = [n for n in lengths if n < expected]
    bigger = [n for n in lengths if n > expected]
    if (longer and bigger) or not shorter:
        return bigger[0]
    return shorter[-1]


class FaultInjector:
    """An engine source that emits one fault every ``1 / rate_hz`` seconds."""

    def __init__(self, profile: LoadedProfile, config: FaultConfig, buses: Iterable[str]) -> None:
        self.config = config
        targets = list(config.buses) if config.buses is not None else list(buses)
        unknown = sorted(set(targets) - {b.name for b in profile.spec.buses})
        if unknown or not targets:
            raise ValueError(f"cannot inject on bus(es) {unknown or '(none)'}: "
                             f"the profile has {[b.name for b in profile.spec.buses]}")
        self.buses: Sequence[str] = targets
        self.period_ns = max(1, int(1e9 / config.rate_hz))
        self.counts: dict[str, int] = dict.fromkeys(config.kinds, 0)
        self._fd = {b.name: b.fd for b in profile.spec.buses}
        self._messages = {b: simulated_messages(profile, b) for b in targets}
        self._standard_ids, self._extended_ids = unknown_ids(profile)
        self._event = 0
        self._base = 0
        self._k = 0

    def start(self, start_ns: int) -> int:
        self._base = start_ns + self.period_ns // 2  # not on top of the ECUs' first frames
        self._k = 0
        return self._base

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int]:
        kinds = self.config.kinds
        kind = kinds[self._event % len(kinds)]
        bus = self.buses[(self._event // len(kinds)) % len(self.buses)]
        round_ = self._event // (len(kinds) * len(self.buses))
        frame = self.make(kind, bus, round_)
        self._event += 1
        self._k, deadline, _ = next_slot(self._base, self.period_ns, self._k, tick.now_ns)
        if frame is None:
            return [], deadline
        self.counts[kind] += 1
        return [(bus, frame)], deadline

    def make(self, kind: str, bus: str, n: int) -> can.Message | None:
        """The ``n``-th fault of ``kind`` for ``bus``."""
        if kind == "error-frames":
            error_class, detail = _ERROR_FRAMES[n % len(_ERROR_FRAMES)]
            return can.Message(is_error_frame=True, arbitration_id=error_class,
                               is_extended_id=False, dlc=8, data=detail)
        if kind == "unknown-ids":
            extended = n % 2 == 1
            ids = self._extended_ids if extended else self._standard_ids
            payload = bytes([0xDE, 0xAD, n & 0xFF, 0, 0, 0, 0, 0])
            return can.Message(arbitration_id=ids[(n // 2) % len(ids)], is_extended_id=extended,
                               data=payload)
        messages = self._messages[bus]
        if not messages:
            return None
        message = messages[n % len(messages)]
        fd = bool(message.is_fd or message.length > 8)
        length = wrong_length(message.length, fd or self._fd[bus], longer=n % 2 == 1)
        is_fd = fd or length > 8
        return can.Message(arbitration_id=message.frame_id,
                           is_extended_id=message.is_extended_frame, is_fd=is_fd,
                           bitrate_switch=is_fd, data=bytes([0x55] * length))


__all__ = ["FAULT_KINDS", "FaultConfig", "FaultInjector", "parse_kinds", "unknown_ids",
           "wrong_length"]
