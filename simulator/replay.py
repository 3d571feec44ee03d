"""Replay a recorded CAN log onto the profile's buses, at recorded speed or faster.

Any format python-can's :class:`can.LogReader` reads works (candump ``.log``, ``.asc``,
``.blf``, ``.trc``, ``.csv``, ...). The log is streamed, not loaded. Frame ``i`` goes out at
``start + (t_i - t_0) / speed``; frames due together go out together.

Which bus a recorded frame goes to:

1. ``channel_map`` (log channel -> bus name), when it names the frame's channel;
2. the only target bus, when there is exactly one;
3. the target bus whose name, profile channel or actual channel equals the frame's channel.

Frames that match none are skipped and counted in ``skipped``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import can
import structlog

from agent.profile.loader import LoadedProfile
from simulator.engine import Outgoing, Source, Tick
from simulator.inject import FaultConfig
from simulator.runner import BusOverrides, BusRunner

log = structlog.get_logger(__name__)


class Router:
    """Chooses the target bus of a recorded frame from its channel."""

    def __init__(self, targets: Mapping[str, Iterable[str]],
                 channel_map: Mapping[str, str] | None = None) -> None:
        """``targets``: bus name -> channel names it answers to (profile and actual channel)."""
        self.targets = {name: set(channels) for name, channels in targets.items()}
        self.channel_map = dict(channel_map or {})
        bad = sorted(set(self.channel_map.values()) - set(self.targets))
        if bad:
            raise ValueError(f"channel map names bus(es) {', '.join(bad)} that are not being "
                             f"replayed onto (buses: {', '.join(self.targets)})")
        self._by_channel: dict[str, str] = {}
        for name, channels in self.targets.items():
            for channel in channels:
                self._by_channel.setdefault(channel, name)

    def route(self, channel: object) -> str | None:
        key = "" if channel is None else str(channel)
        if key in self.channel_map:
            return self.channel_map[key]
        if len(self.targets) == 1:
            return next(iter(self.targets))
        if key in self.targets:
            return key
        return self._by_channel.get(key)


def copy_frame(recorded: can.Message) -> can.Message:
    """A fresh frame with the recorded content (timestamps and channel are the sender's)."""
    return can.Message(arbitration_id=recorded.arbitration_id,
                       is_extended_id=recorded.is_extended_id,
                       is_remote_frame=recorded.is_remote_frame,
                       is_error_frame=recorded.is_error_frame, is_fd=recorded.is_fd,
                       bitrate_switch=recorded.bitrate_switch,
                       error_state_indicator=recorded.error_state_indicator,
                       dlc=recorded.dlc, data=bytes(recorded.data))


class LogReplay:
    """Engine source streaming one log file."""

    def __init__(self, path: str | Path, router: Router, *, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"replay speed must be > 0, got {speed}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"log file not found: {self.path}")
        try:
            can.LogReader(self.path).stop()  # an unsupported format fails here, not mid-run
        except ValueError as exc:
            raise ValueError(f"cannot replay {self.path.name}: {exc}") from None
        self.router = router
        self.speed = speed
        self.sent = 0
        self.skipped = 0
        self.skipped_channels: set[str] = set()
        self.done = False  # every frame of the log has been sent or skipped
        self.error: str | None = None  # why reading stopped early (a malformed log)
        self.read = 0
        self._reader: can.io.generic.MessageReader | None = None
        self._messages: Iterator[can.Message] = iter(())
        self._pending: can.Message | None = None
        self._first = 0.0
        self._start_ns = 0

    def start(self, start_ns: int) -> int | None:
        self.close()
        self.done = False
        self.read = 0
        self._reader = can.LogReader(self.path)
        self._messages = iter(self._reader)
        self._pending = self._next()
        if self._pending is None:
            self.close()
            self.done = True
            return None
        self._first = self._pending.timestamp
        self._start_ns = start_ns
        return start_ns

    def _due(self, message: can.Message) -> int:
        offset = max(0.0, message.timestamp - self._first) / self.speed
        return self._start_ns + int(offset * 1e9)

    def fire(self, tick: Tick) -> tuple[list[Outgoing], int | None]:
        if self._pending is None:
            # Called once more after the last frames went out, so ``done`` follows the send.
            self.done = True
            self.close()
            if self.skipped:
                log.warning("replay_skipped_frames", count=self.skipped,
                            channels=sorted(self.skipped_channels),
                            hint="map log channels to buses with --map CHANNEL=BUS")
            return [], None
        frames: list[Outgoing] = []
        while self._pending is not None and self._due(self._pending) <= tick.now_ns:
            bus = self.router.route(self._pending.channel)
            if bus is None:
                self.skipped += 1
                self.skipped_channels.add(str(self._pending.channel))
            else:
                frames.append((bus, copy_frame(self._pending)))
            self._pending = self._next()
        self.sent += len(frames)
        return frames, tick.now_ns if self._pending is None else self._due(self._pending)

    def _next(self) -> can.Message | None:
        """The next recorded frame; None at the end or at a line the reader cannot parse."""
        try:
            message = next(self._messages, None)
        except Exception as exc:  # the readers raise many types on malformed input
            self.error = f"{self.path.name}: unreadable after {self.read} frames: {exc}"
            log.error("replay_log_unreadable", file=str(self.path), error=str(exc),
                      frames_before=self.read)
            return None
        if message is not None:
            self.read += 1
        return message

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None


class ReplayRunner(BusRunner):
    """Replays a log onto the chosen buses; finished when the log is exhausted."""

    def __init__(self, profile: LoadedProfile | str | Path, path: str | Path, *,
                 buses: BusOverrides | None = None, only: Iterable[str] | None = None,
                 speed: float = 1.0, channel_map: Mapping[str, str] | None = None,
                 inject: FaultConfig | None = None) -> None:
        super().__init__(profile, buses=buses, only=only, inject=inject)
        profile_channels = {b.name: b.channel for b in self.profile.spec.buses}
        targets = {name: {profile_channels[name], self.bus_endpoint(name)[1]}
                   for name in self.bus_names}
        self.replay = LogReplay(path, Router(targets, channel_map), speed=speed)

    def sources(self) -> list[Source]:
        return [self.replay]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the whole log is sent (True), or timeout or stop (False)."""
        return self.wait_for(lambda: self.replay.done, timeout)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.replay.close()

    def status_line(self) -> str:
        return (f"{super().status_line()} | replayed {self.replay.sent}"
                + (f", skipped {self.replay.skipped}" if self.replay.skipped else ""))


__all__ = ["LogReplay", "ReplayRunner", "Router", "copy_frame"]
