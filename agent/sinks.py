"""Record sinks. The pipeline emits to one :class:`~agent.records.Sink`.

A lazy name -> class registry (like python-can's interface registry) keeps optional
dependencies out of start-up: the MQTT uplink is only imported when configured.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from agent.records import Aggregate, Event, Record, Sample, Sink

SINKS: dict[str, str] = {
    "jsonl": "agent.sinks:JsonLinesSink",
}


def sink_class(name: str) -> type[Any]:
    module, _, attr = SINKS[name].partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), attr)
    return cls


def record_to_json(record: Record) -> dict[str, Any]:
    if isinstance(record, Sample):
        return {"type": "sample", **asdict(record)}
    if isinstance(record, Aggregate):
        return {"type": "aggregate", **asdict(record)}
    if isinstance(record, Event):
        return {
            "type": "event", "rule": record.rule, "trigger_ts_ns": record.trigger_ts_ns,
            "condition": record.condition, "clock_synced": record.clock_synced,
            "samples": [{"signal": s.signal, "ts_ns": s.ts_ns, "value": s.value}
                        for s in record.samples],
        }
    raise TypeError(f"not a record: {record!r}")


class JsonLinesSink(Sink):
    """One JSON object per line, to a file (appended) or stdout."""

    def __init__(self, path: str = "-") -> None:
        self._lock = threading.Lock()
        self._owned = path != "-"
        self._out: IO[str] = (
            Path(path).open("a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
            if self._owned else sys.stdout
        )

    def emit(self, records: list[Record]) -> None:
        if not records:
            return
        text = "".join(json.dumps(record_to_json(r), separators=(",", ":")) + "\n"
                       for r in records)
        with self._lock:
            self._out.write(text)
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            if self._owned:
                self._out.close()
            else:
                self._out.flush()


class TeeSink(Sink):
    """Delivers every record to several sinks (the uplink and a local copy)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def emit(self, records: list[Record]) -> None:
        for sink in self.sinks:
            sink.emit(records)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class MemorySink(Sink):
    """Keeps records in a list; for tests and benchmarks."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def emit(self, records: list[Record]) -> None:
        with self._lock:
            self.records.extend(records)

    def close(self) -> None:
        pass
