"""Fixtures for the vcan tier: real SocketCAN interfaces, which exist only where the kernel
has SocketCAN. ``scripts/vcan-tier .venv/bin/pytest -m vcan tests/vcan`` provides them
(natively or in a user-mode-linux guest); anywhere else these tests skip with a reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import can
import pytest

RUN_HINT = "run the vcan tier: scripts/vcan-tier .venv/bin/pytest -m vcan tests/vcan"
ARPHRD_CAN = 280  # /sys/class/net/<if>/type of CAN interfaces
IFF_UP = 0x1


def vcan_problem(name: str) -> str | None:
    """Why ``name`` is not a usable (existing, CAN, up) interface; None when it is."""
    device = Path("/sys/class/net") / name
    if not device.exists():
        return f"{name} does not exist"
    if int((device / "type").read_text()) != ARPHRD_CAN:
        return f"{name} is not a CAN interface"
    if not int((device / "flags").read_text(), 16) & IFF_UP:
        return f"{name} is down"
    return None


def require_vcan(*names: str) -> None:
    # scripts/test.sh sets VCAN_REQUIRED inside the tier, where a skip would hide a broken set-up.
    for name in names:
        problem = vcan_problem(name)
        if problem and os.environ.get("VCAN_REQUIRED"):
            pytest.fail(f"{problem}, but VCAN_REQUIRED is set")
        if problem:
            pytest.skip(f"{problem}; {RUN_HINT}")


@pytest.fixture
def vcan_channel() -> Iterator[str]:
    """vcan0, or a skip when this kernel has no such interface."""
    require_vcan("vcan0")
    yield "vcan0"


@pytest.fixture
def vcan_channels() -> Iterator[tuple[str, str]]:
    """vcan0 and vcan1 (two separate buses), or a skip."""
    require_vcan("vcan0", "vcan1")
    yield ("vcan0", "vcan1")


@pytest.fixture
def sender(vcan_channel: str) -> Iterator[can.BusABC]:
    """A plain python-can SocketCAN bus on vcan0 that can send CAN FD frames."""
    bus = can.Bus(interface="socketcan", channel=vcan_channel, fd=True)
    yield bus
    bus.shutdown()
