"""CAN ingestion: python-can buses in, decoded values into the rule engine.

:class:`FrameProcessor` is the per-frame hot path (no I/O): drop what is not needed,
skip decoding when the bits holding needed signals repeat the previous frame's (most
frames on a real bus only change their alive counter and checksum), and otherwise decode
only the needed signals. :class:`BusReader` is the thin adapter around one python-can bus:
kernel filters, receive buffer, reopen with backoff.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import can
import structlog
from tenacity import Retrying, retry_if_exception_type, stop_any, wait_exponential_jitter
from tenacity.stop import stop_base

from agent.decode import MessageDecoder
from agent.errors import BusUnavailable, FrameRejected
from agent.logs import LogLimiter
from agent.profile.loader import LoadedProfile
from agent.rules import RuleEngine

log = structlog.get_logger(__name__)

EXTENDED_KEY = 1 << 31


def frame_key(arbitration_id: int, extended: bool) -> int:
    return arbitration_id | EXTENDED_KEY if extended else arbitration_id


@dataclass
class BusStats:
    frames: int = 0
    decoded: int = 0
    repeated: int = 0
    error_frames: int = 0
    unknown_id: int = 0
    not_needed: int = 0
    wrong_length: int = 0
    decode_errors: int = 0
    out_of_range: int = 0
    bus_errors: int = 0
    reopens: int = 0
    kernel_drops: int = 0
    receive_buffer_bytes: int = 0  # as the kernel reports it: twice what was asked (socket(7))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class FrameHandler:
    decoder: MessageDecoder
    names: list[str]
    last_bits: int = -1  # relevant bits of the last decoded frame; -1: none yet
    repeat_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BusEndpoint:
    """Where and how to open one profile bus on this machine."""

    name: str
    interface: str
    channel: str
    bitrate: int
    fd: bool
    data_bitrate: int | None
    options: Mapping[str, str | int | float | bool] = field(default_factory=dict)


def build_handlers(profile: LoadedProfile, bus: str, engine: RuleEngine) -> dict[int, FrameHandler]:
    """Decoders for the messages of ``bus`` the agent needs, keyed by :func:`frame_key`."""
    used = profile.signals_needed()
    fd = next(b.fd for b in profile.spec.buses if b.name == bus)
    by_message: dict[int, list[Any]] = {}
    for name in sorted(used):
        entry = profile.catalog[name]
        if entry.bus == bus:
            key = frame_key(entry.message.frame_id, entry.message.is_extended_frame)
            by_message.setdefault(key, []).append(entry)
    handlers = {}
    aggregated = engine.aggregated_signals
    for key, entries in by_message.items():
        decoder = MessageDecoder(entries[0].message, entries, fd=fd)
        names = [e.name for e in entries]
        handlers[key] = FrameHandler(decoder, names,
                                     repeat_names=[n for n in names if n in aggregated])
    return handlers


def known_frame_keys(profile: LoadedProfile, bus: str) -> set[int]:
    return {frame_key(m.frame_id, m.is_extended_frame) for m in profile.databases[bus].messages}


def kernel_filters(handlers: Iterable[int]) -> list[can.typechecking.CanFilter]:
    filters: list[can.typechecking.CanFilter] = []
    for key in sorted(handlers):
        extended = bool(key & EXTENDED_KEY)
        filters.append({"can_id": key & ~EXTENDED_KEY,
                        "can_mask": 0x1FFFFFFF if extended else 0x7FF,
                        "extended": extended})
    return filters


class FrameProcessor:
    """Per-frame work for one bus. ``lock`` guards the shared rule engine."""

    def __init__(self, bus: str, handlers: dict[int, FrameHandler], engine: RuleEngine,
                 lock: threading.Lock, known_keys: Iterable[int] = (),
                 clock: Callable[[], float] = time.monotonic, limiter: LogLimiter | None = None) -> None:
        self.bus = bus
        self.handlers = handlers
        self.known_keys = frozenset(known_keys)
        self.engine = engine
        self.lock = lock
        self.clock = clock
        self.stats = BusStats()
        self.limiter = limiter or LogLimiter()

    def process(self, msg: can.Message) -> None:
        stats = self.stats
        stats.frames += 1
        if msg.is_error_frame:
            stats.error_frames += 1
            if self.limiter.allow((self.bus, "error_frame")):
                log.warning("CAN error frame", bus=self.bus, id=hex(msg.arbitration_id),
                            data=bytes(msg.data).hex())
            return
        key = msg.arbitration_id | EXTENDED_KEY if msg.is_extended_id else msg.arbitration_id
        handler = self.handlers.get(key)
        if handler is None:
            if key in self.known_keys:
                stats.not_needed += 1  # where no kernel/hardware filter removed it
                return
            stats.unknown_id += 1
            if self.limiter.allow((self.bus, key)):
                log.info("frame with an id the database does not know", bus=self.bus,
                         id=hex(msg.arbitration_id), extended=msg.is_extended_id)
            return
        now = self.clock()
        try:
            bits = handler.decoder.relevant_bits(msg.data)
            if bits == handler.last_bits:
                stats.repeated += 1
                with self.lock:
                    self.engine.repeat(now, handler.names)
                return
            result = handler.decoder.decode_bits(bits)
        except FrameRejected as exc:
            if exc.reason == "wrong_length":
                stats.wrong_length += 1
            else:
                stats.decode_errors += 1
            if self.limiter.allow((self.bus, key, exc.reason)):
                log.warning("frame rejected", bus=self.bus, reason=exc.reason, detail=exc.detail)
            return
        handler.last_bits = bits
        stats.decoded += 1
        if result.out_of_range:
            stats.out_of_range += len(result.out_of_range)
            for name in result.out_of_range:
                if self.limiter.allow((self.bus, name, "range")):
                    log.warning("value outside database range", bus=self.bus, signal=name)
        with self.lock:
            self.engine.update(now, result.values)


# python-can filters these in software, dropping error frames with the rest; the frame
# handler lookup is the same filter, cheaper, and keeps error frames visible.
SOFTWARE_FILTERED_INTERFACES = frozenset({"virtual"})


def open_bus(endpoint: BusEndpoint, filters: list[can.typechecking.CanFilter],
             receive_buffer_bytes: int) -> can.BusABC:
    """Open one python-can bus; SocketCAN gets the loss-visible adapter."""
    kwargs: dict[str, Any] = {**endpoint.options, "fd": endpoint.fd}
    if endpoint.interface not in SOFTWARE_FILTERED_INTERFACES:
        kwargs["can_filters"] = filters
    try:
        if endpoint.interface == "socketcan":
            from agent.canbus.socketcan import MonitoredSocketcanBus

            monitored: can.BusABC = MonitoredSocketcanBus(
                channel=endpoint.channel, receive_buffer_bytes=receive_buffer_bytes, **kwargs)
            return monitored
        if endpoint.interface not in ("virtual",):
            kwargs["bitrate"] = endpoint.bitrate
            if endpoint.fd and endpoint.data_bitrate:
                kwargs["data_bitrate"] = endpoint.data_bitrate
        bus: can.BusABC = can.Bus(interface=endpoint.interface, channel=endpoint.channel, **kwargs)
        return bus
    except (can.CanError, OSError, ValueError) as exc:
        raise BusUnavailable(f"cannot open {endpoint.interface}:{endpoint.channel}: {exc}") from exc


class _StopWhen(stop_base):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: Any) -> bool:
        return self.event.is_set()


class BusReader(threading.Thread):
    """Reads one bus until stopped; a bus that fails is closed and reopened with backoff."""

    def __init__(self, endpoint: BusEndpoint, processor: FrameProcessor, stop: threading.Event,
                 receive_buffer_bytes: int, reopen_initial_s: float = 0.5,
                 reopen_max_s: float = 30.0) -> None:
        super().__init__(name=f"can-{endpoint.name}", daemon=True)
        self.endpoint = endpoint
        self.processor = processor
        self.stop = stop
        self.receive_buffer_bytes = receive_buffer_bytes
        self.filters = kernel_filters(processor.handlers)
        self.reopen_wait = wait_exponential_jitter(multiplier=reopen_initial_s, max=reopen_max_s)
        self.opened = threading.Event()
        self._drops_base = 0
        # The open bus, for transmit() from other threads; the lock keeps a send from
        # racing the bus being shut down for a reopen.
        self._bus: can.BusABC | None = None
        self._tx_lock = threading.Lock()

    def transmit(self, msg: can.Message, timeout: float = 0.1) -> None:
        """Send one frame on this reader's bus; :class:`BusUnavailable` when it is not open."""
        with self._tx_lock:
            bus = self._bus
            if bus is None:
                raise BusUnavailable(f"bus {self.endpoint.name} is not open")
            try:
                bus.send(msg, timeout=timeout)
            except (can.CanError, OSError) as exc:
                raise BusUnavailable(f"send on bus {self.endpoint.name} failed: {exc}") from exc

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _open(self) -> can.BusABC:
        for attempt in Retrying(wait=self.reopen_wait, stop=stop_any(_StopWhen(self.stop)),
                                retry=retry_if_exception_type(BusUnavailable), reraise=True,
                                sleep=self._sleep):
            with attempt:
                n = attempt.retry_state.attempt_number
                try:
                    bus = open_bus(self.endpoint, self.filters, self.receive_buffer_bytes)
                except BusUnavailable as exc:
                    self.processor.stats.reopens += 1
                    log.warning("bus unavailable, retrying", bus=self.endpoint.name,
                                attempt=n, error=str(exc))
                    raise
                log.info("bus open", bus=self.endpoint.name, interface=self.endpoint.interface,
                         channel=self.endpoint.channel, filters=len(self.filters))
                self.processor.stats.receive_buffer_bytes = int(
                    getattr(bus, "receive_buffer_bytes", 0))
                return bus
        raise BusUnavailable("stopped")  # pragma: no cover - Retrying re-raises or returns

    def run(self) -> None:
        stats = self.processor.stats
        process = self.processor.process
        while not self.stop.is_set():
            try:
                bus = self._open()
            except BusUnavailable:
                return
            with self._tx_lock:
                self._bus = bus
            self.opened.set()
            try:
                while not self.stop.is_set() and stats.frames == 0:
                    msg = bus.recv(timeout=0.2)
                    if msg is not None:
                        log.info("first frame read", bus=self.endpoint.name, wall_ns=time.time_ns())
                        process(msg)
                while not self.stop.is_set():
                    msg = bus.recv(timeout=0.2)
                    if msg is not None:
                        process(msg)
                    drops = getattr(bus, "kernel_drops", None)
                    if drops is not None:
                        stats.kernel_drops = self._drops_base + int(drops)
            except (can.CanError, OSError) as exc:
                stats.bus_errors += 1
                log.warning("bus failed, reopening", bus=self.endpoint.name, error=str(exc))
            finally:
                self._drops_base = stats.kernel_drops
                self.opened.clear()
                with self._tx_lock:
                    self._bus = None
                with contextlib.suppress(can.CanError, OSError):
                    bus.shutdown()
