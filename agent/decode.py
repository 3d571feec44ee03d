"""Selective decoding of CAN frames: only the signals some rule needs.

Pure (bytes in, values out). For each needed message a :class:`MessageDecoder` is
compiled once from the cantools database: every needed signal becomes a shift and a
mask over the payload read as one integer, so a frame costs one ``int.from_bytes``
per byte order plus a few integer operations per needed signal, instead of
cantools' full decode of every signal of every frame. Results are identical to
``cantools`` ``decode_message`` (enforced by tests against it).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cantools.database.can import Message, Signal

from agent.errors import FrameRejected
from agent.profile.loader import CatalogSignal
from agent.records import SignalValue

# CAN FD data lengths: a payload is padded up to the next valid length.
_FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)


def padded_length(length: int) -> int:
    return next(n for n in _FD_LENGTHS if n >= length)


@dataclass(slots=True)
class FieldDecoder:
    """One signal: where its bits are and how raw becomes physical."""

    name: str
    big_endian: bool
    shift: int
    mask: int
    sign_bit: int  # 0 for unsigned
    scale: float | int
    offset: float | int
    integer: bool
    float_format: str | None
    choices: dict[int, str] | None
    minimum: float | None
    maximum: float | None
    out_of_range: str
    mux_index: int = -1  # index of the multiplexer field in MessageDecoder.fields, or -1
    mux_ids: frozenset[int] = frozenset()
    selects: frozenset[int] | None = None  # for a multiplexer selector: the ids the database knows
    emit: bool = True  # False for a multiplexer selector no rule asked for

    def little_endian_mask(self, nbits: int) -> int:
        """The bits of this signal, positioned in the payload read as a little-endian integer."""
        if not self.big_endian:
            return self.mask << self.shift
        mask = 0
        for k in range(nbits - self.shift - self.mask.bit_length(), nbits - self.shift):
            mask |= 1 << (8 * (k // 8) + 7 - k % 8)  # big-endian bit index k -> byte k//8
        return mask

    def raw(self, little: int, big: int) -> int:
        raw = ((big if self.big_endian else little) >> self.shift) & self.mask
        if self.sign_bit and raw & self.sign_bit:
            raw -= self.sign_bit << 1
        return raw

    def physical(self, raw: int) -> SignalValue:
        if self.choices is not None:
            name = self.choices.get(raw)
            if name is not None:
                return name
        if self.float_format is not None:
            size = struct.calcsize(self.float_format)
            value: float | int = struct.unpack(
                self.float_format, (raw & self.mask).to_bytes(size, "big"))[0]
            return value * self.scale + self.offset
        if self.integer:
            return int(raw * self.scale + self.offset)
        return raw * self.scale + self.offset


@dataclass(slots=True)
class DecodeResult:
    values: list[tuple[str, SignalValue]] = field(default_factory=list)
    out_of_range: list[str] = field(default_factory=list)


class MessageDecoder:
    """Decodes the needed signals of one message (multiplexing included)."""

    def __init__(self, message: Message, wanted: Iterable[CatalogSignal], fd: bool = False) -> None:
        self.message = message
        self.frame_id: int = message.frame_id
        self.extended: bool = message.is_extended_frame
        self.length: int = message.length
        self.accepted_lengths = {message.length}
        if fd or message.is_fd:
            self.accepted_lengths.add(padded_length(message.length))
        self.nbits = 8 * message.length
        self.fields: list[FieldDecoder] = []
        self._index: dict[str, int] = {}
        # Selector values the database knows, per selector: anything else is undescribed data.
        self.known_mux_ids: dict[str, frozenset[int]] = {}
        for sig in message.signals:
            if sig.multiplexer_signal is not None:
                known = self.known_mux_ids.get(sig.multiplexer_signal, frozenset())
                self.known_mux_ids[sig.multiplexer_signal] = known | set(sig.multiplexer_ids or ())
        entries = list(wanted)
        for entry in entries:
            self._add(entry.signal, entry.name, entry.out_of_range)
        self.needed_names = [e.name for e in entries]
        self.any_big = any(f.big_endian for f in self.fields)
        self.relevant_mask = 0
        for f in self.fields:
            self.relevant_mask |= f.little_endian_mask(self.nbits)

    def _add(self, signal: Signal, name: str | None, out_of_range: str) -> int:
        key = signal.name
        if key in self._index:
            existing = self.fields[self._index[key]]
            if name is not None:  # a catalog entry for a signal first added as a mux selector
                existing.name, existing.emit, existing.out_of_range = name, True, out_of_range
            return self._index[key]
        mux_index, mux_ids = -1, frozenset[int]()
        if signal.multiplexer_signal is not None:
            selector = self.message.get_signal_by_name(signal.multiplexer_signal)
            mux_index = self._add(selector, None, "keep")
            mux_ids = frozenset(signal.multiplexer_ids or ())
        decoder = _compile_field(signal, name or signal.name, out_of_range, self.nbits,
                                 mux_index, mux_ids)
        decoder.emit = name is not None
        if signal.name in self.known_mux_ids:
            decoder.selects = self.known_mux_ids[signal.name]
        self.fields.append(decoder)
        self._index[key] = len(self.fields) - 1
        return len(self.fields) - 1

    def relevant_bits(self, data: bytes | bytearray) -> int:
        """The payload's bits that needed signals (and their selectors) occupy, as one integer.

        Frames whose relevant bits equal the previous frame's carry the same values, even when
        alive counters or checksums in other bits changed, so they need no decoding.
        """
        if len(data) not in self.accepted_lengths:
            raise FrameRejected("wrong_length", f"{self.message.name} (0x{self.frame_id:X}) has "
                                f"{len(data)} bytes, database says {self.length}")
        return int.from_bytes(data, "little") & self.relevant_mask

    def decode(self, data: bytes | bytearray) -> DecodeResult:
        return self.decode_bits(self.relevant_bits(data))

    def decode_bits(self, little: int) -> DecodeResult:
        """Decode from :meth:`relevant_bits` (bits of signals not needed are zero)."""
        big = int.from_bytes(little.to_bytes(self.length, "little"), "big") if self.any_big else 0
        result = DecodeResult()
        raws: list[int] = []
        for f in self.fields:
            raw = f.raw(little, big)
            raws.append(raw)
            if f.selects is not None and raw not in f.selects:
                raise FrameRejected("unknown_multiplexer", f"{self.message.name} (0x{self.frame_id:X}): "
                                    f"{f.name} = {raw} selects no signals in the database")
            if f.mux_index >= 0 and raws[f.mux_index] not in f.mux_ids:
                continue
            if not f.emit:
                continue
            value = f.physical(raw)
            if f.float_format is not None and not math.isfinite(value):  # type: ignore[arg-type]
                result.out_of_range.append(f.name)  # NaN/inf is never a measurement
                continue
            if not isinstance(value, str) and (
                (f.minimum is not None and value < f.minimum)
                or (f.maximum is not None and value > f.maximum)
            ):
                result.out_of_range.append(f.name)
                if f.out_of_range == "drop":
                    continue
                if f.out_of_range == "clamp":
                    value = min(max(value, f.minimum if f.minimum is not None else value),
                                f.maximum if f.maximum is not None else value)
            result.values.append((f.name, value))
        return result


def _compile_field(signal: Signal, name: str, out_of_range: str, nbits: int,
                   mux_index: int, mux_ids: frozenset[int]) -> FieldDecoder:
    length = signal.length
    big = signal.byte_order == "big_endian"
    if big:
        msb = 8 * (signal.start // 8) + (7 - signal.start % 8)
        shift = nbits - msb - length
    else:
        shift = signal.start
    conversion = signal.conversion
    scale, offset = conversion.scale, conversion.offset
    float_format = None
    if signal.is_float:
        float_format = {32: ">f", 64: ">d", 16: ">e"}.get(length)
        if float_format is None:
            raise ValueError(f"float signal {signal.name} has unsupported length {length}")
    integer = (not signal.is_float and float(scale).is_integer() and float(offset).is_integer())
    choices = ({int(k): str(v) for k, v in signal.choices.items()} if signal.choices else None)
    return FieldDecoder(
        name=name,
        big_endian=big,
        shift=shift,
        mask=(1 << length) - 1,
        sign_bit=(1 << (length - 1)) if signal.is_signed and not signal.is_float else 0,
        scale=int(scale) if integer else scale,
        offset=int(offset) if integer else offset,
        integer=integer,
        float_format=float_format,
        choices=choices,
        minimum=signal.minimum,
        maximum=signal.maximum,
        out_of_range=out_of_range,
        mux_index=mux_index,
        mux_ids=mux_ids,
    )
