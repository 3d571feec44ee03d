"""A python-can bus that fails on demand, registered as interface "flaky" for tests."""

from __future__ import annotations

import threading
from typing import Any

import can
import can.util
from can.interfaces.virtual import VirtualBus

FAIL_NEXT_RECV = threading.Event()
OPENED = []


class FlakyBus(VirtualBus):
    def __init__(self, channel: Any = None, **kwargs: Any) -> None:
        super().__init__(channel=channel, **kwargs)
        OPENED.append(self)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if FAIL_NEXT_RECV.is_set():
            FAIL_NEXT_RECV.clear()
            raise can.CanOperationError("simulated adapter unplugged")
        return super()._recv_internal(timeout)


# python-can validates names against a frozenset copied into can.util at import time.
can.interfaces.BACKENDS["flaky"] = ("tests.flaky_bus", "FlakyBus")
can.util.VALID_INTERFACES = frozenset({*can.util.VALID_INTERFACES, "flaky"})
