"""The vehicle's ECUs: every message of every bus, encoded from the scenario at its cycle time.

Each DBC message becomes a :class:`MessageEncoder`. Signal values come from:

* the profile catalog: the scenario value of the canonical name (enumerations by choice name);
* counters (name ends in ``Counter``, e.g. ``_Counter``/``AliveCounter``): +1 per frame,
  wrapping over the signal's raw range;
* checksums (name ends in ``CRC`` or ``Checksum``): the sum of every payload byte not holding
  a checksum, modulo the signal's raw range (``sum(bytes) % 256`` for an 8-bit signal);
* anything else: GenSigStartValue (cantools ``signal.initial``) or 0, clamped into range.

The simulator plays every node but the telematics unit: messages sent only by
:data:`TELEMATICS_NODES`, messages with send type OnRequest/NoMsgSendType and diagnostic
requests/responses (UDS/OBD) are not sent -- those only ever answer the agent.

Multiplexed messages send one page per frame, in turn. Messages with a cycle time are sent
every ``cycle_time`` ms on a drift-free grid; messages without one whenever their content
changes (checked every 50 ms) and at least once a second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import can
import structlog
from cantools.database.can import Message, Signal
from cantools.database.errors import EncodeError

from agent.profile.loader import LoadedProfile
from simulator.engine import Outgoing, Tick, next_slot
from simulator.scenario import Value

log = structlog.get_logger(__name__)

TELEMATICS_NODES = ("TCU", "TELEMATICS")
ON_CHANGE_POLL_NS = 50_000_000
ON_CHANGE_HEARTBEAT_NS = 1_000_000_000
EncodeValue = int | float | str


def is_counter(name: str) -> bool:
    return name.lower().endswith("counter")


def is_checksum(name: str) -> bool:
    return name.lower().endswith(("crc", "checksum"))


def is_diagnostic(message: Message) -> bool:
    """UDS/OBD request or response (ISO 15765 ids, or named so in the database)."""
    name = message.name.lower()
    if any(word in name for word in ("diag", "uds", "obd")):
        return True
    if message.is_extended_frame:
        return (message.frame_id >> 16) in (0x18DA, 0x18DB)
    return 0x7DF <= message.frame_id <= 0x7EF


def not_simulated_reason(message: Message, telematics_nodes: Iterable[str] = TELEMATICS_NODES
                         ) -> str | None:
    """Why the vehicle simulator does not send ``message``, or None when it does."""
    if message.is_container:
        return "AUTOSAR container (carries PDUs, not signals)"
    nodes = {n.upper() for n in telematics_nodes}
    senders = {s.upper() for s in message.senders}
    if senders and senders <= nodes:
        return f"sent by the telematics unit ({', '.join(sorted(message.senders))})"
    if message.send_type in ("OnRequest", "NoMsgSendType"):
        return f"send type {message.send_type}"
    if is_diagnostic(message):
        return "diagnostic request/response"
    return None


def simulated_messages(profile: LoadedProfile, bus: str,
                       telematics_nodes: Iterable[str] = TELEMATICS_NODES) -> list[Message]:
    return [m for m in profile.databases[bus].messages
            if not_simulated_reason(m, telematics_nodes) is None]


def raw_range(signal: Signal) -> tuple[int, int]:
    """Raw integer values a signal can carry: its bit width, narrowed by its min/max."""
    if signal.is_signed:
        lo, hi = -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
    else:
        lo, hi = 0, (1 << signal.length) - 1
    scale, offset = float(signal.scale), float(signal.offset)
    for bound, is_minimum in ((signal.minimum, True), (signal.maximum, False)):
        if bound is None or scale == 0:
            continue
        raw = (bound - offset) / scale
        # A physical minimum bounds the raw value from below when the scale is positive.
        if is_minimum == (scale > 0):
            lo = max(lo, math.ceil(raw - 1e-9))
        else:
            hi = min(hi, math.floor(raw + 1e-9))
    return lo, max(lo, hi)


def quantize(signal: Signal, value: float, raw_bounds: tuple[int, int] | None = None
             ) -> int | float:
    """The encodable physical value nearest to ``value``: on the raw grid, inside the range.

    ``raw_bounds`` is :func:`raw_range` of the signal, when the caller has it at hand.
    """
    if signal.is_float:
        lo = signal.minimum if signal.minimum is not None else -math.inf
        hi = signal.maximum if signal.maximum is not None else math.inf
        return min(max(float(value), lo), hi)
    lo, hi = raw_bounds or raw_range(signal)
    scale, offset = signal.scale, signal.offset
    raw = min(max(round((value - offset) / scale), lo), hi)
    return raw_to_physical(signal, raw)


def raw_to_physical(signal: Signal, raw: int) -> int | float:
    if signal.scale == 1 and signal.offset == 0:
        return raw
    return raw * signal.scale + signal.offset


@dataclass
class _Page:
    """One multiplexer page: what each of its signals gets, and where checksums sit."""

    fixed: dict[str, EncodeValue]  # selectors and start values: the same in every frame
    catalog: list[Signal]
    counters: list[Signal]
    checksums: list[Signal]
    checksum_bytes: frozenset[int] = frozenset()


@dataclass
class EncoderStats:
    clamped: int = 0  # scenario values outside the signal's range
    unknown_choices: int = 0  # scenario enum names the DBC does not list
    encode_errors: int = 0  # frames cantools refused to encode (not sent)


class MessageEncoder:
    """Builds the frames of one DBC message from scenario state."""

    def __init__(self, bus: str, message: Message, canonical: Mapping[str, str],
                 *, bus_fd: bool = False) -> None:
        """``canonical`` maps this message's signal names to catalog (canonical) names."""
        self.bus = bus
        self.message = message
        self.canonical = dict(canonical)
        self.is_fd = bool(message.is_fd or (bus_fd and message.length > 8))
        self.stats = EncoderStats()
        self._ranges = {s.name: raw_range(s) for s in message.signals}
        self._choice_names: dict[str, dict[str, str]] = {}
        for signal in message.signals:
            if signal.choices:
                names = {str(v): str(v) for v in signal.choices.values()}
                names.update({k.lower(): v for k, v in list(names.items())})
                self._choice_names[signal.name] = names
        self._counters = {s.name: self._ranges[s.name][0] for s in message.signals
                          if is_counter(s.name) and s.name not in self.canonical}
        self._warned: set[str] = set()
        self._catalog_signals = [s for s in message.signals if s.name in self.canonical]
        self.pages = [self._plan(sel, sigs) for sel, sigs in _expand(message.signal_tree, message)]
        self._page_cycle = itertools.cycle(range(len(self.pages)))

    @property
    def period_ns(self) -> int | None:
        cycle = self.message.cycle_time
        return int(cycle * 1_000_000) if cycle else None

    def content(self, state: Mapping[str, Value]) -> tuple[EncodeValue, ...]:
        """The scenario-driven part of the message, to tell whether it changed."""
        return tuple(self._catalog_value(s, state) for s in self._catalog_signals)

    def encode(self, state: Mapping[str, Value]) -> bytes:
        """Payload of the next frame: next mux page, counters advanced, checksums filled."""
        page = self.pages[next(self._page_cycle)]
        values = dict(page.fixed)
        for signal in page.catalog:
            values[signal.name] = self._catalog_value(signal, state)
        for signal in page.counters:
            raw = self._counters[signal.name]
            lo, hi = self._ranges[signal.name]
            self._counters[signal.name] = lo if raw >= hi else raw + 1
            values[signal.name] = raw_to_physical(signal, raw)
        data = self.message.encode(values, scaling=True, strict=True)
        if page.checksums:
            total = sum(b for i, b in enumerate(data) if i not in page.checksum_bytes)
            for signal in page.checksums:
                lo, hi = self._ranges[signal.name]
                values[signal.name] = raw_to_physical(signal, lo + total % (hi - lo + 1))
            data = self.message.encode(values, scaling=True, strict=True)
        return data

    def frame(self, state: Mapping[str, Value]) -> can.Message:
        return can.Message(arbitration_id=self.message.frame_id,
                           is_extended_id=self.message.is_extended_frame,
                           is_fd=self.is_fd, bitrate_switch=self.is_fd,
                           data=self.encode(state))

    def frames(self, state: Mapping[str, Value]) -> list[Outgoing]:
        """The next frame ready for the engine; none (counted, logged once) if unencodable."""
        try:
            return [(self.bus, self.frame(state))]
        except (EncodeError, ValueError, KeyError, TypeError) as exc:
            # A database the encoder cannot satisfy must not stop the other ECUs.
            self.stats.encode_errors += 1
            self._warn_once(f"encode:{self.message.name}", "encode_failed", error=str(exc))
            return []

    def _plan(self, selectors: dict[str, int], signals: list[Signal]) -> _Page:
        page = _Page(fixed={}, catalog=[], counters=[], checksums=[])
        for signal in signals:
            name = signal.name
            if name in selectors:
                page.fixed[name] = raw_to_physical(signal, selectors[name])
            elif name in self.canonical:
                page.catalog.append(signal)
            elif name in self._counters:
                page.counters.append(signal)
            elif is_checksum(name):
                page.checksums.append(signal)
                page.fixed[name] = self._default(signal)  # placeholder for the first pass
            else:
                page.fixed[name] = self._default(signal)
        if page.checksums:
            page.checksum_bytes = frozenset().union(
                *(self._bytes_of(selectors, signals, s) for s in page.checksums))
        return page

    def _catalog_value(self, signal: Signal, state: Mapping[str, Value]) -> EncodeValue:
        name = self.canonical[signal.name]
        value = state.get(name)
        if value is None:
            self._warn_once(name, "scenario_has_no_value", signal=signal.name)
            return self._default(signal)
        if isinstance(value, str):
            choices = self._choice_names.get(signal.name)
            match = (choices.get(value) or choices.get(value.lower())) if choices else None
            if match is None:
                self.stats.unknown_choices += 1
                self._warn_once(name, "unknown_choice", value=value, signal=signal.name,
                                choices=sorted(set((choices or {}).values())))
                return self._default(signal)
            return match
        encoded = quantize(signal, float(value), self._ranges[signal.name])
        if abs(encoded - float(value)) > abs(float(signal.scale)):
            self.stats.clamped += 1
            self._warn_once(name, "value_clamped", value=value, sent=encoded, signal=signal.name)
        return encoded

    def _default(self, signal: Signal) -> EncodeValue:
        raw = signal.raw_initial
        return quantize(signal, 0.0 if raw is None else raw * signal.scale + signal.offset,
                        self._ranges[signal.name])

    def _bytes_of(self, selectors: dict[str, int], signals: list[Signal],
                  target: Signal) -> frozenset[int]:
        """Payload bytes that hold ``target``: set its raw bits to all ones and compare."""
        raw: dict[str, int] = {s.name: 0 for s in signals}
        raw.update(selectors)
        zero = self.message.encode(raw, scaling=False, strict=False)
        raw[target.name] = -1 if target.is_signed else (1 << target.length) - 1
        ones = self.message.encode(raw, scaling=False, strict=False)
        return frozenset(i for i, (a, b) in enumerate(zip(zero, ones, strict=True)) if a != b)

    def _warn_once(self, key: str, event: str, **details: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(event, bus=self.bus, message=self.message.name, canonical=key, **details)


def _expand(tree: Sequence[object], message: Message) -> list[tuple[dict[str, int], list[Signal]]]:
    """Every combination of multiplexer pages in a cantools signal tree."""
    combos: list[tuple[dict[str, int], list[Signal]]] = [({}, [])]
    for node in tree:
        if isinstance(node, str):
            signal = message.get_signal_by_name(node)
            combos = [(sel, [*sigs, signal]) for sel, sigs in combos]
            continue
        assert isinstance(node, dict)
        for mux_name, pages in node.items():
            mux = message.get_signal_by_name(mux_name)
            options = [({**sub_sel, mux_name: mux_id}, [mux, *sub_sigs])
                       for mux_id, subtree in sorted(pages.items())
                       for sub_sel, sub_sigs in _expand(subtree, message)]
            combos = [({**sel, **o_sel}, [*sigs, *o_sigs])
                      for sel, sigs in combos for o_sel, o_sigs in options]
    return combos


class PeriodicMessage:
    """Sends one message every ``cycle_time`` on the grid ``start + offset + k * period``."""

    def __init__(self, encoder: MessageEncoder, period_ns: int, offset_ns: int = 0) -> None:
        self.encoder = encoder
        self.period_ns = period_ns
        self.offset_ns = offset_ns % period_ns
        self.sent = 0
        self.skipped = 0
        self._base = 0
        self._k = 0

    def start(self, start_ns: int) -> int:
        self._base = start_ns + self.offset_ns
        self._k = 0
        return self._base

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int]:
        frames = self.encoder.frames(tick.state)
        self.sent += len(frames)
        self._k, deadline, skipped = next_slot(self._base, self.period_ns, self._k, tick.now_ns)
        self.skipped += skipped
        return frames, deadline


class OnChangeMessage:
    """Sends a message without a cycle time when its content changes, or after a second."""

    def __init__(self, encoder: MessageEncoder, offset_ns: int = 0) -> None:
        self.encoder = encoder
        self.offset_ns = offset_ns % ON_CHANGE_POLL_NS
        self.sent = 0
        self._base = 0
        self._k = 0
        self._last_content: tuple[EncodeValue, ...] | None = None
        self._last_sent_ns = 0

    def start(self, start_ns: int) -> int:
        self._base = start_ns + self.offset_ns
        self._k = 0
        self._last_content = None
        return self._base

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int]:
        content = self.encoder.content(tick.state)
        frames: list[Outgoing] = []
        if (content != self._last_content
                or tick.now_ns - self._last_sent_ns >= ON_CHANGE_HEARTBEAT_NS):
            frames = self.encoder.frames(tick.state)
            self._last_content = content
            self._last_sent_ns = tick.now_ns
            self.sent += len(frames)
        self._k, deadline, _ = next_slot(self._base, ON_CHANGE_POLL_NS, self._k, tick.now_ns)
        return frames, deadline


class Ecu:
    """The simulated messages of the profile's buses (or of ``only`` those) as engine sources."""

    def __init__(self, profile: LoadedProfile, only: Iterable[str] | None = None, *,
                 telematics_nodes: Iterable[str] = TELEMATICS_NODES) -> None:
        wanted = set(only) if only is not None else {b.name for b in profile.spec.buses}
        nodes = tuple(telematics_nodes)
        self.not_sent: dict[tuple[str, str], str] = {}  # (bus, message) -> why not
        by_message: dict[tuple[str, int], dict[str, str]] = {}
        for name, entry in profile.catalog.items():
            key = (entry.bus, entry.message.frame_id)
            by_message.setdefault(key, {})[entry.signal.name] = name
        self.encoders: list[MessageEncoder] = []
        for bus in profile.spec.buses:
            if bus.name not in wanted:
                continue
            for message in profile.databases[bus.name].messages:
                reason = not_simulated_reason(message, nodes)
                if reason is not None:
                    self.not_sent[(bus.name, message.name)] = reason
                    continue
                canonical = by_message.get((bus.name, message.frame_id), {})
                self.encoders.append(MessageEncoder(bus.name, message, canonical, bus_fd=bus.fd))
        self.sources: list[PeriodicMessage | OnChangeMessage] = []
        for index, encoder in enumerate(self.encoders):
            offset = index * 1_000_000  # spread messages over the period, like separate ECUs
            period = encoder.period_ns
            self.sources.append(PeriodicMessage(encoder, period, offset) if period
                                else OnChangeMessage(encoder, offset))

    def canonical_names(self) -> set[str]:
        return {name for e in self.encoders for name in e.canonical.values()}


__all__ = ["TELEMATICS_NODES", "Ecu", "EncoderStats", "MessageEncoder", "OnChangeMessage",
           "PeriodicMessage", "is_checksum", "is_counter", "is_diagnostic", "not_simulated_reason",
           "quantize", "raw_range", "simulated_messages"]
