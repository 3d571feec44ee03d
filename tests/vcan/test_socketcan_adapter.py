"""MonitoredSocketcanBus over a real vcan: frames, kernel filters, error frames, receive
buffer and the kernel's drop counter. Frames on one interface arrive in order, so every
"this did not arrive" check reads up to a later sentinel frame instead of waiting.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import pytest

from agent.canbus.socketcan import MonitoredSocketcanBus

pytestmark = pytest.mark.vcan

RECV_TIMEOUT_S = 10.0  # only bounds a hang; every expected frame is already on its way
BUFFER_BYTES = 1 << 20
SENTINEL_ID = 0x7FE


def monitored(channel: str, **kwargs: Any) -> MonitoredSocketcanBus:
    """The adapter under test; use it as a context manager (BusABC shuts it down)."""
    kwargs.setdefault("receive_buffer_bytes", BUFFER_BYTES)
    return MonitoredSocketcanBus(channel=channel, **kwargs)


def receive(bus: can.BusABC) -> can.Message:
    msg = bus.recv(timeout=RECV_TIMEOUT_S)
    assert msg is not None, "expected frame did not arrive"
    return msg


def receive_until_sentinel(bus: can.BusABC) -> list[can.Message]:
    """Every frame before the sentinel (which is consumed)."""
    seen = []
    while (msg := receive(bus)).arbitration_id != SENTINEL_ID:
        seen.append(msg)
    return seen


def sentinel() -> can.Message:
    return can.Message(arbitration_id=SENTINEL_ID, is_extended_id=False, data=b"\xff")


SENT = [
    can.Message(arbitration_id=0x123, is_extended_id=False, data=b"\x01\x02\x03"),
    can.Message(arbitration_id=0x1ABCDE01, is_extended_id=True, data=bytes(range(8))),
    can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b""),
    can.Message(arbitration_id=0x456, is_extended_id=False, is_remote_frame=True, dlc=4),
    can.Message(arbitration_id=0x18FF50E5, is_extended_id=True, is_fd=True,
                bitrate_switch=True, data=bytes(range(64))),
    can.Message(arbitration_id=0x321, is_extended_id=False, is_fd=True,
                error_state_indicator=True, data=bytes(range(12))),
    can.Message(arbitration_id=0x0, is_extended_id=True, is_fd=True, data=b"\xaa" * 7),
]


@pytest.fixture
def reference(vcan_channel: str) -> Iterator[can.BusABC]:
    """python-can's own SocketcanBus, receiving alongside the adapter."""
    bus = can.Bus(interface="socketcan", channel=vcan_channel, fd=True)
    yield bus
    bus.shutdown()


def test_frames_arrive_as_python_can_delivers_them(vcan_channel: str, sender: can.BusABC,
                                                   reference: can.BusABC) -> None:
    with monitored(vcan_channel, fd=True) as bus:
        for msg in SENT:
            sender.send(msg, timeout=RECV_TIMEOUT_S)
        got = [receive(bus) for _ in SENT]
        expected = [receive(reference) for _ in SENT]

    for sent, ours, theirs in zip(SENT, got, expected, strict=True):
        assert ours.equals(theirs, timestamp_delta=None), (ours, theirs)
        assert ours.arbitration_id == sent.arbitration_id
        assert ours.is_extended_id == sent.is_extended_id
        assert ours.is_remote_frame == sent.is_remote_frame
        assert ours.is_fd == sent.is_fd
        assert ours.bitrate_switch == sent.bitrate_switch
        assert ours.error_state_indicator == sent.error_state_indicator
        assert ours.dlc == sent.dlc
        assert ours.data == (b"" if sent.is_remote_frame else sent.data)
        assert ours.channel == vcan_channel
        assert not ours.is_error_frame
    timestamps = [m.timestamp for m in got]
    assert timestamps[0] > 0
    assert timestamps == sorted(timestamps)


def test_kernel_filters_are_honoured(vcan_channel: str, sender: can.BusABC) -> None:
    filters = [
        {"can_id": 0x123, "can_mask": 0x7FF, "extended": False},
        {"can_id": 0x1ABCDE00, "can_mask": 0x1FFFFF00, "extended": True},
        {"can_id": SENTINEL_ID, "can_mask": 0x7FF, "extended": False},
    ]
    frames = [
        can.Message(arbitration_id=0x124, is_extended_id=False, data=b"\x00"),
        can.Message(arbitration_id=0x123, is_extended_id=False, data=b"\x01"),
        can.Message(arbitration_id=0x123, is_extended_id=True, data=b"\x02"),  # EFF, no match
        can.Message(arbitration_id=0x1ABCDE7F, is_extended_id=True, data=b"\x03"),
        can.Message(arbitration_id=0x1ABCDF00, is_extended_id=True, data=b"\x04"),
        can.Message(arbitration_id=0x200, is_extended_id=False, data=b"\x05"),
    ]
    with monitored(vcan_channel, can_filters=filters) as bus:
        assert bus._is_filtered  # the kernel filters, python-can does not filter again
        for msg in [*frames, sentinel()]:
            sender.send(msg, timeout=RECV_TIMEOUT_S)
        # read below BusABC.recv, which would also filter in software had the kernel not
        passed = []
        while True:
            got, _ = bus._recv_internal(timeout=RECV_TIMEOUT_S)
            assert got is not None
            if got.arbitration_id == SENTINEL_ID:
                break
            passed.append((got.arbitration_id, got.is_extended_id, bytes(got.data)))
    assert passed == [(0x123, False, b"\x01"), (0x1ABCDE7F, True, b"\x03")]


def error_frame() -> can.Message:
    # controller problem (CAN_ERR_CRTL = 0x4): RX error warning in data[1]
    return can.Message(arbitration_id=0x004, is_error_frame=True, is_extended_id=False,
                       data=bytes([0, 0x04, 0, 0, 0, 0, 0, 0]))


def test_error_frames_arrive_as_error_frames(vcan_channel: str, sender: can.BusABC) -> None:
    # vcan passes a raw frame with CAN_ERR_FLAG from one local socket to the others, so a
    # plain python-can bus can inject it (cansend vcan0 20000004#0004000000000000 does too)
    with monitored(vcan_channel) as bus:
        sender.send(error_frame(), timeout=RECV_TIMEOUT_S)
        msg = receive(bus)
    assert msg.is_error_frame
    assert msg.arbitration_id == 0x004
    assert msg.data == bytes([0, 0x04, 0, 0, 0, 0, 0, 0])


def test_error_frames_can_be_ignored(vcan_channel: str, sender: can.BusABC) -> None:
    with monitored(vcan_channel, ignore_rx_error_frames=True) as bus:
        sender.send(error_frame(), timeout=RECV_TIMEOUT_S)
        sender.send(sentinel(), timeout=RECV_TIMEOUT_S)
        assert receive_until_sentinel(bus) == []


def rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


def test_receive_buffer_is_what_the_kernel_granted(vcan_channel: str) -> None:
    wanted = 4 * rmem_max()  # beyond what plain SO_RCVBUF may grant
    with monitored(vcan_channel, receive_buffer_bytes=wanted) as bus:
        assert bus.receive_buffer_bytes == bus.socket.getsockopt(socket.SOL_SOCKET,
                                                                 socket.SO_RCVBUF)
        if os.geteuid() == 0:
            assert bus.receive_buffer_bytes >= wanted  # SO_RCVBUFFORCE
        else:
            assert bus.receive_buffer_bytes >= rmem_max()  # capped by net.core.rmem_max


def test_buffer_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="receive_buffer_bytes"):  # before any socket exists
        MonitoredSocketcanBus(channel="vcan0", receive_buffer_bytes=0)


def test_overflow_shows_as_kernel_drops(vcan_channel: str, sender: can.BusABC) -> None:
    burst = 5000
    # 1 byte asks for the kernel's minimum buffer: a handful of frames
    with monitored(vcan_channel, receive_buffer_bytes=1) as bus:
        for i in range(burst):
            sender.send(can.Message(arbitration_id=0x100, is_extended_id=False,
                                    data=i.to_bytes(4, "little")), timeout=RECV_TIMEOUT_S)
        # The drop count rides on frames queued after the drops: read what was queued, then
        # send sentinels until one is queued (one sent while the queue is full is dropped).
        burst_read, sentinels_sent = 0, 0
        while True:
            msg = bus.recv(timeout=0.5)
            if msg is None:
                sender.send(sentinel(), timeout=RECV_TIMEOUT_S)
                sentinels_sent += 1
            elif msg.arbitration_id == SENTINEL_ID:
                break
            else:
                burst_read += 1
        drops = bus.kernel_drops
    assert drops > 0
    # every frame sent was either read or counted as dropped at this socket
    assert burst_read + 1 + drops == burst + sentinels_sent


def test_any_channel_bus_reports_each_frames_interface(vcan_channels: tuple[str, str]) -> None:
    first, second = vcan_channels
    senders = {name: can.Bus(interface="socketcan", channel=name) for name in vcan_channels}
    try:
        with monitored("") as everywhere, monitored(second) as only_second:
            senders[second].send(can.Message(arbitration_id=0x10, is_extended_id=False))
            senders[first].send(can.Message(arbitration_id=0x20, is_extended_id=False))
            senders[second].send(can.Message(arbitration_id=0x30, is_extended_id=False))
            # the order across two interfaces is not defined
            seen_everywhere = {(m.arbitration_id, m.channel) for m in
                               (receive(everywhere) for _ in range(3))}
            seen_by_second = [receive(only_second) for _ in range(2)]
    finally:
        for bus in senders.values():
            bus.shutdown()
    assert seen_everywhere == {(0x10, second), (0x20, first), (0x30, second)}
    assert [(m.arbitration_id, m.channel) for m in seen_by_second] == [(0x10, second),
                                                                        (0x30, second)]
