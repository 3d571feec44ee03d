"""What the collection pipeline emits: samples and captured events.

These are plain data with no behaviour, shared by the rule engine, every sink and
(later) the outbox and wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

SignalValue = float | int | str


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one signal.

    ``ts_ns`` is wall-clock UTC in nanoseconds since the Unix epoch, taken when the frame
    carrying the value was received; ``clock_synced`` tells whether the wall clock was
    known to be synchronised then. ``rule`` names the collection rule that selected it.
    """

    signal: str
    ts_ns: int
    value: SignalValue
    rule: str
    clock_synced: bool


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Statistics of one signal over one window [start_ns, end_ns)."""

    signal: str
    rule: str
    start_ns: int
    end_ns: int
    values: dict[str, SignalValue]
    clock_synced: bool


@dataclass(frozen=True, slots=True)
class Event:
    """A condition-triggered capture with its pre- and post-trigger window."""

    rule: str
    trigger_ts_ns: int
    condition: str
    samples: tuple[Sample, ...] = field(default=())
    clock_synced: bool = False


Record = Sample | Aggregate | Event
RecordKind = Literal["sample", "aggregate", "event"]


class Sink(Protocol):
    """Where the pipeline delivers records; implementations must not block for long."""

    def emit(self, records: list[Record]) -> None: ...

    def close(self) -> None: ...
