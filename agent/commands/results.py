"""Command results on the wire: what the vehicle reports back about a command.

A result is stored in the durable outbox like a telemetry batch (so it survives an outage
and a restart), with the vehicle's next sequence number, and published on
``{prefix}/{vehicle_id}/cmd/res``. Pure: no I/O. Format in docs/protocol.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from agent.errors import RejectedInput
from agent.wire import BatchRejected, strict_cbor

RESULTS_STREAM: Final = "cmd/res"
RESULT_VERSION: Final = 1
STATES: Final = ("accepted", "rejected", "in_progress", "succeeded", "failed", "timed_out", "expired")
FINAL_STATES: Final = frozenset({"rejected", "succeeded", "failed", "timed_out", "expired"})
MAX_RESULT_BYTES: Final = 16 * 1024
_MAX_DEPTH: Final = 6

Plain = None | bool | int | float | str | list["Plain"] | dict[str, "Plain"]


class ResultRejected(RejectedInput):
    """A result payload that does not follow the format."""


def plain(value: object, depth: int = 0) -> Plain:
    """Details as CBOR/JSON-safe plain data (unknown types become their text)."""
    if depth > _MAX_DEPTH:
        return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v, depth + 1) for v in value]
    return str(value)


@dataclass(frozen=True)
class CommandResult:
    command_id: str
    state: str
    ts_ms: int
    command: str | None = None
    reason: str | None = None
    detail: dict[str, Plain] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Plain]:
        out: dict[str, Plain] = {"command_id": self.command_id, "state": self.state, "ts_ms": self.ts_ms,
                                 "detail": self.detail}
        if self.command is not None:
            out["command"] = self.command
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class ResultBatch:
    """A result as an outbox batch (the outbox's SealableBatch shape)."""

    result: CommandResult
    vehicle_id: str
    boot_id: str
    stream: str = RESULTS_STREAM
    sample_count: int = 0

    def seal(self, seq: int) -> bytes:
        payload: bytes = cbor2.dumps({"v": RESULT_VERSION, "vehicle_id": self.vehicle_id,
                                      "boot_id": self.boot_id, "seq": seq, "result": self.result.to_plain()})
        return payload


@dataclass(frozen=True)
class DecodedResult:
    vehicle_id: str
    boot_id: str
    seq: int
    result: CommandResult


def decode_result(payload: bytes) -> DecodedResult:
    if len(payload) > MAX_RESULT_BYTES:
        raise ResultRejected("too_large", f"{len(payload)} bytes")
    try:
        doc = strict_cbor(payload, "result")
    except BatchRejected as exc:
        raise ResultRejected("malformed", exc.detail) from None
    try:
        if not isinstance(doc, dict) or doc.get("v") != RESULT_VERSION:
            raise ValueError("not a version 1 result")
        body = doc["result"]
        state = body["state"]
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        result = CommandResult(
            command_id=_text(body["command_id"]), state=state, ts_ms=_int(body["ts_ms"]),
            command=_text(body["command"]) if "command" in body else None,
            reason=_text(body["reason"]) if "reason" in body else None,
            detail=dict(body["detail"]) if isinstance(body["detail"], dict) else {},
        )
        return DecodedResult(_text(doc["vehicle_id"]), _text(doc["boot_id"]), _int(doc["seq"]), result)
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultRejected("malformed", str(exc)) from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise ValueError(f"expected text, got {value!r:.40}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r:.40}")
    return value
