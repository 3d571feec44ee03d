"""SocketCAN with loss visibility: python-can's :class:`SocketcanBus` plus two kernel features.

* A larger socket receive buffer, so bursts survive a briefly busy reader. As root
  ``SO_RCVBUFFORCE`` may exceed ``net.core.rmem_max``; otherwise ``SO_RCVBUF`` is capped by
  it. The size the kernel really granted is read back as :attr:`receive_buffer_bytes`
  (Linux reports twice the requested value: it counts its own bookkeeping).
* ``SO_RXQ_OVFL``: once this socket has dropped a frame (buffer full), the kernel attaches
  its cumulative drop count to every frame it queues, exposed as :attr:`kernel_drops` (a
  u32; it wraps). A burst's losses therefore show when the next frame after it is read.

python-can's own receive path asserts a single ancillary item (the timestamp), so
:meth:`_recv_internal` does its own ``recvmsg`` and builds the :class:`can.Message` the way
python-can does (``dissect_can_frame``: error frames, FD flags, extended IDs, DLC).
"""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

import can
import structlog
from can.interfaces.socketcan import constants
from can.interfaces.socketcan.socketcan import SocketcanBus, dissect_can_frame
from can.typechecking import CanFilters

log = structlog.get_logger(__name__)

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; needs CAP_NET_ADMIN
SO_RXQ_OVFL = 40
_TIMESPEC = struct.Struct("@ll")
_DROP_COUNT = struct.Struct("@I")
ANCILLARY_BUFFER_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_DROP_COUNT.size)


def set_receive_buffer(sock: socket.socket, wanted_bytes: int) -> int:
    """Ask for ``wanted_bytes`` of receive buffer; return what the kernel granted."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted_bytes)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted_bytes)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted


class MonitoredSocketcanBus(SocketcanBus):
    """A :class:`SocketcanBus` whose kernel-side frame losses are visible.

    :param receive_buffer_bytes: socket receive buffer to ask for (see the module docstring).
    Other parameters are :class:`SocketcanBus`'s.
    """

    def __init__(self, channel: str = "", *, receive_buffer_bytes: int,
                 receive_own_messages: bool = False, local_loopback: bool = True,
                 fd: bool = False, can_filters: CanFilters | None = None,
                 ignore_rx_error_frames: bool = False, **kwargs: Any) -> None:
        if receive_buffer_bytes <= 0:
            raise ValueError(f"receive_buffer_bytes must be positive, got {receive_buffer_bytes}")
        super().__init__(channel=channel, receive_own_messages=receive_own_messages,
                         local_loopback=local_loopback, fd=fd, can_filters=can_filters,
                         ignore_rx_error_frames=ignore_rx_error_frames, **kwargs)
        self.kernel_drops = 0
        try:
            self.receive_buffer_bytes = set_receive_buffer(self.socket, receive_buffer_bytes)
            self.socket.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        except OSError:
            self.shutdown()
            raise
        if self.receive_buffer_bytes < receive_buffer_bytes:
            log.warning("receive buffer smaller than configured; raise net.core.rmem_max or "
                        "run with CAP_NET_ADMIN", channel=channel,
                        wanted_bytes=receive_buffer_bytes, granted_bytes=self.receive_buffer_bytes)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        try:
            ready, _, _ = select.select([self.socket], [], [], timeout)
        except OSError as error:
            raise can.CanOperationError(f"Failed to receive: {error.strerror}",
                                        error.errno) from error
        if not ready:
            return None, self._is_filtered
        try:
            frame, ancillary, flags, address = self.socket.recvmsg(
                constants.CANFD_MTU, ANCILLARY_BUFFER_SIZE)
        except OSError as error:
            raise can.CanOperationError(f"Error receiving: {error.strerror}",
                                        error.errno) from error
        timestamp = 0.0
        for level, kind, data in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if kind == constants.SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                if nanoseconds >= 1_000_000_000:
                    raise can.CanOperationError(
                        f"Timestamp nanoseconds field was out of range: {nanoseconds}")
                timestamp = seconds + nanoseconds * 1e-9
            elif kind == SO_RXQ_OVFL:
                (self.kernel_drops,) = _DROP_COUNT.unpack_from(data)
        # bound to every interface (channel ""): the frame says which one it came from
        channel = self.channel or (address[0] if isinstance(address, tuple) else address)
        return _message(frame, timestamp, channel, flags), self._is_filtered


def _message(frame: bytes, timestamp: float, channel: str, msg_flags: int) -> can.Message:
    """``frame`` (struct can_frame / canfd_frame) as python-can's capture_message builds it."""
    can_id, dlc, fd_flags, data = dissect_can_frame(frame)
    extended = bool(can_id & constants.CAN_EFF_FLAG)
    return can.Message(
        timestamp=timestamp,
        channel=channel,
        arbitration_id=can_id & (0x1FFFFFFF if extended else 0x7FF),
        is_extended_id=extended,
        is_remote_frame=bool(can_id & constants.CAN_RTR_FLAG),
        is_error_frame=bool(can_id & constants.CAN_ERR_FLAG),
        is_fd=len(frame) == constants.CANFD_MTU,
        # MSG_DONTROUTE marks a frame sent from this host (local loopback)
        is_rx=not (msg_flags & socket.MSG_DONTROUTE),
        bitrate_switch=bool(fd_flags & constants.CANFD_BRS),
        error_state_indicator=bool(fd_flags & constants.CANFD_ESI),
        dlc=dlc,
        data=data,
    )
