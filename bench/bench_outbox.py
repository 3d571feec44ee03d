"""Outbox and wire-format benchmark; prints a markdown section for docs/benchmarks.md.

    .venv/bin/python bench/bench_outbox.py [--seconds 20] [--dir /var/tmp]

Synthetic but realistic load at a busy-bus rate of 10,000 samples/s: 900 signals at
10 Hz (CAN-quantised values with small noise), 800 slowly varying signals at 1 Hz and
200 enum signals at 1 Hz, timestamps in wall-clock ns with reception jitter. Measures:

* the flush at that rate (encode + one outbox commit of ~10k samples, as OutboxSink
  does once per second): latency p50/p99 and the commits/s it could sustain;
* the largest commit rate with small batches (10 samples each);
* bytes on the wire per sample for CBOR batches (zstd, zlib, none) against a naive
  JSON object per sample ({"vehicle", "signal", "ts", "value"}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.batcher import OutboxSink
from agent.outbox import Outbox, OutboxSettings, Priority
from agent.records import Record, Sample
from agent.wire import Compression, encode_records

VEHICLE = "WVWZZZ1JZXW000001"
BOOT = "5f0c1d7e9a8b4c3d2e1f0a9b8c7d6e5f"
T0 = 1_750_000_000_000_000_000
GEARS = ("PARK", "REVERSE", "NEUTRAL", "DRIVE")
STATES = ("OFF", "ACC", "ON", "START")


class Vehicle:
    """Signal generators; ``second(k)`` yields one second of samples (~10,000)."""

    def __init__(self, seed: int = 7) -> None:
        self.rnd = random.Random(seed)
        r = self.rnd
        self.fast = [(f"Vehicle.Fast{i:03d}", r.uniform(0, 200), r.choice((0.01, 0.1, 0.5, 1.0)))
                     for i in range(900)]
        self.slow = [(f"Vehicle.Slow{i:03d}", r.uniform(-40, 100), r.choice((0.1, 0.5, 1.0)))
                     for i in range(800)]
        self.enums = [(f"Vehicle.State{i:03d}", r.choice((GEARS, STATES)), 0) for i in range(200)]
        self.fast_values = [v for _, v, _ in self.fast]
        self.slow_values = [v for _, v, _ in self.slow]
        self.enum_index = [0] * len(self.enums)

    def _ts(self, base: int) -> int:
        return base + self.rnd.randint(0, 2_000_000)  # reception jitter up to 2 ms

    def second(self, k: int) -> list[Record]:
        r = self.rnd
        out: list[Record] = []
        base = T0 + k * 1_000_000_000
        for tick in range(10):
            at = base + tick * 100_000_000
            for i, (name, _, factor) in enumerate(self.fast):
                self.fast_values[i] += r.gauss(0, 0.3)
                value = round(self.fast_values[i] / factor) * factor
                out.append(Sample(name, self._ts(at), value, "fast_10hz", True))
        for i, (name, _, factor) in enumerate(self.slow):
            self.slow_values[i] += r.gauss(0, 0.02)
            value = round(self.slow_values[i] / factor) * factor
            out.append(Sample(name, self._ts(base), value, "slow_1hz", True))
        for i, (name, labels, _) in enumerate(self.enums):
            if r.random() < 0.02:
                self.enum_index[i] = (self.enum_index[i] + 1) % len(labels)
            out.append(Sample(name, self._ts(base), labels[self.enum_index[i]], "enum_1hz", True))
        return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_busy_bus(workdir: Path, seconds: int, synchronous: str) -> dict[str, float]:
    vehicle = Vehicle()
    data = [vehicle.second(k) for k in range(seconds)]
    settings = OutboxSettings(path=workdir / f"busy-{synchronous}.sqlite",
                              synchronous=synchronous)  # type: ignore[arg-type]
    encode_ms: list[float] = []
    commit_ms: list[float] = []
    flush_ms: list[float] = []
    with Outbox(settings) as outbox:
        for records in data:
            start = time.perf_counter()
            result = encode_records(records, vehicle_id=VEHICLE, boot_id=BOOT,
                                    compression=settings.compression)
            encoded = time.perf_counter()
            outbox.commit([(Priority.TELEMETRY, b) for b in result.batches])
            done = time.perf_counter()
            encode_ms.append((encoded - start) * 1000)
            commit_ms.append((done - encoded) * 1000)
            flush_ms.append((done - start) * 1000)
        # the same through the sink, as the agent runs it
        sink = OutboxSink(outbox, vehicle_id=VEHICLE, boot_id=BOOT, start_thread=False)
        sink_ms = []
        for records in data:
            sink.emit(records)
            sink_ms.append(timed(sink.flush) * 1000)
        sink.close()
        batches_per_commit = outbox.stats().batches["telemetry"] / (2 * seconds)
    return {
        "samples_per_commit": statistics.mean(len(d) for d in data),
        "batches_per_commit": batches_per_commit,
        "encode_p50": pct(encode_ms, 50), "encode_p99": pct(encode_ms, 99),
        "commit_p50": pct(commit_ms, 50), "commit_p99": pct(commit_ms, 99),
        "flush_p50": pct(sink_ms, 50), "flush_p99": pct(sink_ms, 99),
        "max_flushes_per_s": 1000 / statistics.mean(sink_ms),
    }


def bench_small_commits(workdir: Path, duration_s: float, synchronous: str) -> dict[str, float]:
    vehicle = Vehicle(seed=11)
    records = vehicle.second(0)
    batch = encode_records(records[:10], vehicle_id=VEHICLE, boot_id=BOOT).batches[0]
    settings = OutboxSettings(path=workdir / f"small-{synchronous}.sqlite",
                              synchronous=synchronous)  # type: ignore[arg-type]
    latencies: list[float] = []
    with Outbox(settings) as outbox:
        start = time.perf_counter()
        while time.perf_counter() - start < duration_s:
            latencies.append(timed(lambda: outbox.commit([(Priority.TELEMETRY, batch)])) * 1000)
        elapsed = time.perf_counter() - start
    return {"commits_per_s": len(latencies) / elapsed, "p50": pct(latencies, 50),
            "p99": pct(latencies, 99)}


def wire_sizes(seconds: int) -> tuple[int, dict[str, int], int]:
    vehicle = Vehicle(seed=3)
    data = [vehicle.second(k) for k in range(seconds)]
    samples = sum(len(d) for d in data)
    sizes: dict[str, int] = {}
    compressions: tuple[Compression, ...] = ("zstd", "zlib", "none")
    for compression in compressions:
        total = 0
        seq = 1
        for records in data:  # one flush per second, as the sink does
            for batch in encode_records(records, vehicle_id=VEHICLE, boot_id=BOOT,
                                        compression=compression).batches:
                total += len(batch.seal(seq))
                seq += 1
        sizes[compression] = total
    json_bytes = sum(
        len(json.dumps({"vehicle": VEHICLE, "signal": s.signal, "ts": s.ts_ns,
                        "value": s.value}).encode())
        for records in data for s in records if isinstance(s, Sample))
    return samples, sizes, json_bytes


def rows(table: list[list[str]]) -> Iterator[str]:
    yield "| " + " | ".join(table[0]) + " |"
    yield "|" + "|".join("---" for _ in table[0]) + "|"
    for row in table[1:]:
        yield "| " + " | ".join(row) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20,
                        help="seconds of simulated busy-bus data (one flush each)")
    parser.add_argument("--small-seconds", type=float, default=3.0,
                        help="duration of the small-batch commit-rate run")
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory for the databases (default: a temp dir)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        busy = {s: bench_busy_bus(workdir, args.seconds, s) for s in ("full", "normal")}
        small = {s: bench_small_commits(workdir, args.small_seconds, s)
                 for s in ("full", "normal")}
        fs = os.statvfs(workdir)
    samples, sizes, json_bytes = wire_sizes(min(args.seconds, 10))

    print("## Outbox and wire format (bench/bench_outbox.py)\n")
    print(f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}; filesystem block size {fs.f_bsize}. "
          f"Command: `.venv/bin/python bench/bench_outbox.py --seconds {args.seconds}`.\n")
    b = busy["full"]
    print(f"Busy bus: {b['samples_per_commit']:.0f} samples per flush (1 s at 10,000 "
          f"samples/s), {b['batches_per_commit']:.1f} batches of <= 128 KiB per commit, "
          f"zstd, one transaction per flush.\n")
    table = [["synchronous", "encode p50 / p99 ms", "commit p50 / p99 ms",
              "flush (encode+commit) p50 / p99 ms", "flushes/s sustainable (needed: 1)"]]
    for mode, r in busy.items():
        table.append([mode, f"{r['encode_p50']:.1f} / {r['encode_p99']:.1f}",
                      f"{r['commit_p50']:.1f} / {r['commit_p99']:.1f}",
                      f"{r['flush_p50']:.1f} / {r['flush_p99']:.1f}",
                      f"{r['max_flushes_per_s']:.1f}"])
    print("\n".join(rows(table)) + "\n")
    print("Small batches (10 samples, one batch per commit), as fast as possible:\n")
    table = [["synchronous", "commits/s", "commit p50 ms", "commit p99 ms"]]
    for mode, r in small.items():
        table.append([mode, f"{r['commits_per_s']:.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}"])
    print("\n".join(rows(table)) + "\n")
    print(f"Bytes on the wire per sample ({samples} samples, one batch set per second):\n")
    table = [["encoding", "bytes/sample", "vs JSON per sample"]]
    table.append(["JSON object per sample", f"{json_bytes / samples:.1f}", "1x"])
    for compression, total in sizes.items():
        table.append([f"CBOR columnar, {compression}", f"{total / samples:.2f}",
                      f"{json_bytes / total:.1f}x smaller"])
    print("\n".join(rows(table)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
