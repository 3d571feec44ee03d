"""A receive-only python-can bus that replays a recorded CAN log: interface ``sim-replay``.

``can.Bus(interface="sim-replay", channel="drive.log")`` reads any log python-can's
:class:`can.LogReader` reads (candump ``.log``, ``.asc``, ``.blf``, ``.trc``, ``.csv``, ...),
streaming it, and hands its frames to ``recv`` as if they arrived on a wire. This lets the
agent (or anything else that takes a python-can interface name) run against a recording on a
machine without CAN hardware or SocketCAN::

    telematics-agent run --profile p.yaml --bus powertrain=sim-replay:drive.log

By default frames come as fast as they are read; ``speed`` paces them at the recorded
timing (``speed=2`` twice as fast). Received frames are stamped with the wall-clock time of
their reception, like any bus does. When the log ends the bus stays open and idle (``recv``
times out), so a reader does not mistake the end of a recording for a failed adapter. A log
that cannot be parsed further ends the replay there, logged and counted in ``unreadable``.

python-can finds the interface through the ``can.interface`` entry point of this package;
importing this module also registers it in-process (for a checkout that is not installed).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import can.interfaces
import can.util
import structlog

log = structlog.get_logger(__name__)

INTERFACE_NAME = "sim-replay"

# What a python-can log reader raises on a malformed or truncated file.
_UNREADABLE = (ValueError, IndexError, KeyError, OSError, EOFError, struct.error)


class ReplayBus(can.BusABC):
    """Frames of a recorded log, received in order; sending is refused."""

    def __init__(self, channel: Any = None, can_filters: can.typechecking.CanFilters | None = None,
                 speed: float | None = None, fd: bool = False, **kwargs: Any) -> None:
        if channel is None:
            raise can.CanInitializationError("sim-replay needs the log file path as its channel")
        if speed is not None and speed <= 0:
            raise can.CanInitializationError(f"sim-replay speed must be > 0, got {speed}")
        self.path = Path(str(channel))
        if not self.path.is_file():
            raise can.CanInitializationError(f"sim-replay: log file not found: {self.path}")
        try:
            self._reader = can.LogReader(self.path)
        except (ValueError, OSError) as exc:  # unknown suffix, unreadable file
            raise can.CanInitializationError(f"sim-replay: cannot read {self.path}: {exc}") from exc
        self._frames: Iterator[can.Message] = iter(self._reader)
        self.channel_info = f"sim-replay: {self.path}"
        self.speed = speed
        self.frames_replayed = 0
        self.unreadable = 0
        self.exhausted = False
        self._pending: can.Message | None = None
        self._first_recorded: float | None = None
        self._start = 0.0
        self._closed = threading.Event()
        self._can_protocol = can.CanProtocol.CAN_FD if fd else can.CanProtocol.CAN_20
        super().__init__(channel=str(channel), can_filters=can_filters, **kwargs)

    def _next_recorded(self) -> can.Message | None:
        if self._pending is None and not self.exhausted:
            try:
                self._pending = next(self._frames)
            except StopIteration:
                self.exhausted = True
            except _UNREADABLE as exc:
                self.exhausted = True
                self.unreadable += 1
                log.warning("replay log unreadable, replay ends here", path=str(self.path),
                            frames_replayed=self.frames_replayed, error=str(exc))
        return self._pending

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self._closed.is_set():
            raise can.CanOperationError("sim-replay bus is shut down")
        msg = self._next_recorded()
        if msg is None:  # end of the log: idle like a quiet bus
            self._closed.wait(timeout)
            return None, False
        if self.speed is not None:
            now = time.monotonic()
            if self._first_recorded is None:
                self._first_recorded, self._start = msg.timestamp, now
            due = self._start + (msg.timestamp - self._first_recorded) / self.speed
            if due > now:
                if timeout is not None and due - now > timeout:
                    self._closed.wait(timeout)
                    return None, False
                if self._closed.wait(due - now):
                    raise can.CanOperationError("sim-replay bus is shut down")
        self._pending = None
        msg.timestamp = time.time()
        self.frames_replayed += 1
        return msg, False

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        raise can.CanOperationError(f"sim-replay is receive-only (replaying {self.path})")

    def shutdown(self) -> None:
        self._closed.set()
        self._reader.stop()
        super().shutdown()


def register() -> None:
    """Make ``can.Bus(interface="sim-replay")`` work in this process without the entry point."""
    can.interfaces.BACKENDS[INTERFACE_NAME] = (__name__, ReplayBus.__name__)
    # python-can checks names against a frozenset copied into can.util at import time.
    valid: frozenset[str] = can.util.VALID_INTERFACES  # type: ignore[attr-defined]
    can.util.VALID_INTERFACES = frozenset({*valid, INTERFACE_NAME})  # type: ignore[attr-defined]


register()

__all__ = ["INTERFACE_NAME", "ReplayBus", "register"]
