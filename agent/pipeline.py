"""The collection service: buses -> frame processors -> rule engine -> sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import can
import structlog

from agent.clock import Clock, kernel_clock_synced
from agent.config import BusOverride, CanSettings, ClockSettings
from agent.errors import BusUnavailable
from agent.ingest import BusEndpoint, BusReader, FrameProcessor, build_handlers, known_frame_keys
from agent.logs import LogLimiter
from agent.profile.loader import LoadedProfile
from agent.records import Record, SignalValue, Sink
from agent.rules import RuleEngine

log = structlog.get_logger(__name__)

STATS_LOG_INTERVAL_S = 60.0
CLOCK_CHECK_INTERVAL_S = 1.0
MAX_SLEEP_S = 0.2


def resolve_endpoints(profile: LoadedProfile,
                      overrides: Mapping[str, BusOverride]) -> list[BusEndpoint]:
    endpoints = []
    for bus in profile.spec.buses:
        o = overrides.get(bus.name, BusOverride())
        endpoints.append(BusEndpoint(bus.name, o.interface or bus.interface,
                                     o.channel or bus.channel, o.bitrate or bus.bitrate,
                                     bus.fd, bus.data_bitrate, o.options))
    return endpoints


def make_clock(settings: ClockSettings) -> Clock:
    probe = {"auto": kernel_clock_synced, "assume_synced": lambda: True,
             "assume_unsynced": lambda: False}[settings.synced]
    return Clock(synced=probe, step_threshold_ns=settings.step_threshold_ms * 1_000_000)


@dataclass
class PipelineSettings:
    can: CanSettings
    clock: ClockSettings


class Pipeline:
    def __init__(self, profile: LoadedProfile, sink: Sink,
                 overrides: Mapping[str, BusOverride] | None = None,
                 settings: PipelineSettings | None = None, clock: Clock | None = None) -> None:
        self.profile = profile
        self.sink = sink
        self.settings = settings or PipelineSettings(CanSettings(), ClockSettings())
        self.clock = clock or make_clock(self.settings.clock)
        self.engine = RuleEngine(profile.spec.rules, profile.conditions, self.clock)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self._injected: list[Record] = []  # from emit_records(), delivered by run()
        limiter = LogLimiter()
        self.readers: list[BusReader] = []
        for endpoint in resolve_endpoints(profile, overrides or {}):
            handlers = build_handlers(profile, endpoint.name, self.engine)
            if not handlers and endpoint.name not in profile.actuation_buses():
                log.info("no rule or command needs this bus; not opening it", bus=endpoint.name)
                continue
            processor = FrameProcessor(endpoint.name, handlers, self.engine, self.lock,
                                       known_frame_keys(profile, endpoint.name),
                                       self.clock.monotonic, limiter)
            can_settings = self.settings.can
            self.readers.append(BusReader(endpoint, processor, self.stop_event,
                                          can_settings.receive_buffer_bytes,
                                          can_settings.reopen_initial_s, can_settings.reopen_max_s))

    def stats(self) -> dict[str, object]:
        return {
            "buses": {r.endpoint.name: r.processor.stats.as_dict() for r in self.readers},
            "rules": vars(self.engine.stats).copy(),
            "clock": {"synced": self.clock.synced, "steps": len(self.clock.steps)},
        }

    # -- for remote commands (called from other threads) ---------------------------------
    def transmit(self, bus_name: str, msg: can.Message) -> None:
        """Send one frame on a profile bus the pipeline has open.

        Raises :class:`BusUnavailable` when that bus is not open (being reopened, or never
        opened because no rule reads it) or the send fails.
        """
        reader = next((r for r in self.readers if r.endpoint.name == bus_name), None)
        if reader is None:
            raise BusUnavailable(f"bus {bus_name} is not open: no rule, command or actuation uses it")
        reader.transmit(msg)

    def live_values(self, names: Iterable[str]) -> dict[str, tuple[SignalValue, float]]:
        """Signal -> (latest value, monotonic receive time), for those that have one."""
        out: dict[str, tuple[SignalValue, float]] = {}
        with self.lock:
            for name in names:
                live = self.engine.live(name)
                if live is not None:
                    out[name] = live
        return out

    def reconfigure_rule(self, rule_name: str, fields: Mapping[str, float | int]) -> dict[str, float | int]:
        """Change a running rule's timing (:meth:`RuleEngine.reconfigure`); ValueError if invalid."""
        with self.lock:
            return self.engine.reconfigure(rule_name, fields)

    def emit_records(self, records: Iterable[Record]) -> None:
        """Hand records to the sink through the pipeline thread (the sink's only caller)."""
        with self.lock:
            self._injected.extend(records)

    def _take_records(self) -> list[Record]:
        """Rule output and injected records; the caller holds ``self.lock``."""
        records = self.engine.drain()
        if self._injected:
            records += self._injected
            self._injected = []
        return records

    def start(self) -> None:
        for reader in self.readers:
            reader.start()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """True once every bus is open (for tests and the demo)."""
        deadline = time.monotonic() + timeout
        return all(r.opened.wait(max(0.0, deadline - time.monotonic())) for r in self.readers)

    def run(self, duration: float | None = None) -> None:
        """Schedule rules and deliver records until :meth:`stop` (or ``duration`` s)."""
        self.start()
        mono = self.clock.monotonic
        end = mono() + duration if duration is not None else None
        next_clock_check = mono() + CLOCK_CHECK_INTERVAL_S
        next_stats = mono() + STATS_LOG_INTERVAL_S
        try:
            while not self.stop_event.is_set():
                now = mono()
                if end is not None and now >= end:
                    break
                if now >= next_clock_check:
                    self.clock.check()
                    next_clock_check = now + CLOCK_CHECK_INTERVAL_S
                if now >= next_stats:
                    log.info("pipeline stats", **self.stats())
                    next_stats = now + STATS_LOG_INTERVAL_S
                with self.lock:
                    self.engine.tick(now)
                    records = self._take_records()
                    deadline = self.engine.next_deadline()
                if records:
                    self.sink.emit(records)
                wake = min(deadline, next_clock_check, now + MAX_SLEEP_S)
                if end is not None:
                    wake = min(wake, end)
                self.stop_event.wait(max(0.0, wake - mono()))
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        self.stop_event.set()
        for reader in self.readers:
            reader.join(timeout=5)
        with self.lock:
            self.engine.flush(self.clock.monotonic())
            records = self._take_records()
        if records:
            self.sink.emit(records)
        self.sink.close()
        log.info("pipeline stopped", **self.stats())
