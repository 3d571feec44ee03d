"""Time for the pipeline: monotonic for scheduling, wall-clock UTC for timestamps.

Wall time is derived from the monotonic clock through an anchor, so samples taken in
order get timestamps in order and a scheduler never sees time run backwards. When the
system wall clock is stepped (NTP at boot, a GPS fix, a person with ``date -s``), the
anchor is moved on the next :meth:`Clock.check`; samples before and after keep their
emission order and none are dropped, only their timestamps shift to the corrected
time. ``synced`` tells consumers whether the kernel says the clock is disciplined.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (x86_64/aarch64 layout: longs and a timeval).
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("constant", ctypes.c_long),
                ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
                ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long),
                ("shift", ctypes.c_int), ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long),
                ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long),
                ("tai", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


def kernel_clock_synced() -> bool:
    """True when adjtimex(2) reports a synchronised clock (NTP/PTP/GPS discipline)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    return bool(state != _TIME_ERROR and state >= 0 and not tx.status & _STA_UNSYNC)


@dataclass
class ClockStep:
    at_mono: float
    step_ns: int


class Clock:
    """Maps monotonic seconds to wall-clock UTC nanoseconds.

    ``monotonic`` and ``wall_ns`` are injectable so tests can jump the wall clock.
    """

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        synced: Callable[[], bool] = kernel_clock_synced,
        step_threshold_ns: int = 1_000_000_000,
    ) -> None:
        self.monotonic = monotonic
        self._wall_ns = wall_ns
        self._synced_probe = synced
        self.step_threshold_ns = step_threshold_ns
        self.steps: list[ClockStep] = []
        self._anchor(monotonic())
        self.synced = synced()

    def _anchor(self, mono: float) -> None:
        self._anchor_mono_ns = int(mono * 1e9)
        self._anchor_wall_ns = self._wall_ns()

    def wall_ns(self, mono: float) -> int:
        return self._anchor_wall_ns + int(mono * 1e9) - self._anchor_mono_ns

    def check(self) -> ClockStep | None:
        """Re-anchor when the wall clock has been stepped; refresh the synced flag."""
        mono = self.monotonic()
        predicted = self.wall_ns(mono)
        actual = self._wall_ns()
        self.synced = self._synced_probe()
        step = actual - predicted
        if abs(step) < self.step_threshold_ns:
            return None
        self._anchor_mono_ns = int(mono * 1e9)
        self._anchor_wall_ns = actual
        event = ClockStep(mono, step)
        self.steps.append(event)
        log.warning("wall clock stepped", step_s=round(step / 1e9, 3), synced=self.synced)
        return event
