"""Uplink benchmark: the agent's outbox -> MQTT publisher against naive publishers.

Everything runs over mutual TLS against a real mosquitto the benchmark starts on a loopback
port (:class:`tests.broker.MosquittoBroker`, dev PKI from :func:`tests.broker.make_dev_pki`).
The agent side is the real :class:`~agent.uplink.service.Uplink` (``OutboxSink`` -> SQLite
``Outbox`` -> ``MqttPublisher``); :class:`AckRecorder` wraps its outbox's ``commit``,
``pending`` and ``ack`` to note when each batch is stored and when its PUBACK arrives (no
agent code is changed). Measured, each against a baseline in the same run:

1. Backlog drain: an outbox holding minutes of busy-bus telemetry (10,000 samples/s, one
   batch per 1 s flush, as ``OutboxSink`` commits it) is drained by the publisher; against
   the same payloads published one at a time, waiting for each PUBACK (plain paho, the
   agent's TLS context; with TCP_NODELAY, and on a few batches with paho's defaults), and
   against a JSON message per sample. On loopback, and through a delay proxy (a child
   process) emulating a cellular round trip.
2. Latency from CAN frame to PUBACK at the default 1 s flush interval: the real ingest path
   (python-can virtual bus -> ``Pipeline`` -> the uplink) fed busy-bus frames in real time;
   against a sink that publishes every sample at once as JSON with QoS 1.
3. Bytes on the wire: TCP payload bytes (TLS records: MQTT packets, TLS framing and the
   handshake) of the MQTT connection, read from the kernel's ``TCP_INFO`` counters.

    .venv/bin/python -m bench.bench_uplink [--quick] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BusOverride, CanSettings, ClockSettings
from agent.outbox import Outbox, OutboxSettings, Priority, StoredBatch
from agent.pipeline import Pipeline, PipelineSettings
from agent.pki import PkiDir
from agent.profile.loader import LoadedProfile, load_profile
from agent.records import Aggregate, Record, Sample
from agent.uplink.mqtt import POLL_S, MqttSettings, build_tls_context
from agent.uplink.service import Uplink, UplinkSettings
from agent.wire import EncodedBatch, decode_batch, encode_records
from bench.bench_outbox import Vehicle
from tests.broker import LOOPBACK, MOSQUITTO, VEHICLE_ID, MosquittoBroker, free_port, make_dev_pki

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "firmware_profiles" / "busy_bus" / "busy_bus.yaml"
BUS = "powertrain"
TOPIC = f"vt/{VEHICLE_ID}/telemetry"
BACKLOG_BOOT_ID = "0b5e7a1d2c3f4e5a6b7c8d9e0f1a2b3c"
# The drain is meant to show what the link and the agent can do: the publisher's default
# limit of 50 publishes/s per stream is lifted for it (and only for it).
DRAIN_RATE_LIMIT = 1_000_000.0
DEFAULT_RATE_LIMIT = MqttSettings.model_fields["max_publishes_per_s"].default
WINDOW = MqttSettings.model_fields["max_inflight"].default
WAIT_S = 300.0  # a run that takes longer than this failed; never a timing threshold
NS = 1_000_000_000
ALL_ON_CHANGE = "all_on_change"


# --------------------------------------------------------------------------- environment


class BenchEnv:
    """Dev PKI and a mosquitto with mutual TLS in a temporary directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pki: PkiDir = make_dev_pki(directory / "pki")
        self.broker = MosquittoBroker(self.pki)

    def __enter__(self) -> BenchEnv:
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.close()

    @property
    def port(self) -> int:
        return self.broker.port

    def mqtt_settings(self, port: int | None = None, **overrides: Any) -> MqttSettings:
        """The agent's MQTT settings for this broker (or for a proxy in front of it)."""
        return MqttSettings(host=LOOPBACK, port=port or self.port, ca_file=self.pki.ca_cert,
                            cert_file=self.pki.cert(VEHICLE_ID), key_file=self.pki.key(VEHICLE_ID),
                            **overrides)


# --------------------------------------------------------------------------- measuring tools


@dataclass(frozen=True)
class TcpCounters:
    """TCP payload bytes of this process's connections to one port (from ``TCP_INFO``)."""

    sent: int
    received: int

    def __sub__(self, other: TcpCounters) -> TcpCounters:
        return TcpCounters(self.sent - other.sent, self.received - other.received)


_TCPI_BYTES_ACKED = 120  # struct tcp_info: u64 tcpi_bytes_acked, then u64 tcpi_bytes_received


def tcp_counters(port: int) -> TcpCounters:
    """Bytes sent (and acknowledged) and received on this process's sockets to ``port``.

    Found by scanning ``/proc/self/fd``, so the agent's own connection is measured without
    reaching into the publisher. Counts TCP payload (TLS records), not TCP/IP headers.
    """
    sent = received = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        with sock:
            try:
                if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.getpeername() != (LOOPBACK, port):
                    continue
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except OSError:
                continue
        acked, got = struct.unpack_from("=QQ", info, _TCPI_BYTES_ACKED)
        sent += max(0, acked - 1)  # the SYN counts as one acknowledged byte
        received += got
    return TcpCounters(sent, received)


class AckRecorder:
    """Wraps an outbox's ``commit``, ``pending`` and ``ack`` to note when each batch was stored,
    its payload, and when its PUBACK came, plus the time the publisher spends in the outbox.

    The publisher calls ``ack(seq)`` from its paho ``on_publish`` callback, i.e. when the
    broker's PUBACK has been read; the time is taken before the outbox deletes the batch.
    """

    def __init__(self, outbox: Outbox, *, expected: int | None = None,
                 keep_payloads: bool = False) -> None:
        self._commit = outbox.commit
        self._pending = outbox.pending
        self._ack_many = outbox.ack_many
        self.expected = expected
        self.keep_payloads = keep_payloads
        self.payloads: dict[int, bytes] = {}
        self.committed: dict[int, int] = {}  # seq -> monotonic ns when its commit returned
        self.acks: list[tuple[int, int]] = []  # (seq, monotonic ns)
        self.acked: set[int] = set()
        self.ack_ns = 0  # time spent in the outbox's ack (durable delete)
        self.pending_ns = 0  # time spent in the outbox's pending (next batches to send)
        self.all_acked = threading.Event()
        outbox.commit = self.commit  # type: ignore[method-assign]
        outbox.pending = self.pending  # type: ignore[method-assign]
        outbox.ack_many = self.ack_many  # type: ignore[method-assign]

    def commit(self, batches: Sequence[Any], losses: Sequence[Any] = ()) -> list[int]:
        seqs = self._commit(batches, losses)
        at = time.monotonic_ns()
        for seq in seqs:
            self.committed[seq] = at
        return seqs

    def pending(self, limit: int, **kwargs: Any) -> list[StoredBatch]:
        at = time.monotonic_ns()
        batches = self._pending(limit, **kwargs)
        self.pending_ns += time.monotonic_ns() - at
        if self.keep_payloads:
            for batch in batches:
                self.payloads.setdefault(batch.seq, batch.payload)
        return batches

    def ack_many(self, seqs: Sequence[int]) -> int:
        at = time.monotonic_ns()
        removed = self._ack_many(seqs)
        self.ack_ns += time.monotonic_ns() - at
        for seq in seqs:
            if seq not in self.acked:
                self.acked.add(seq)
                self.acks.append((seq, at))
        if self.expected is not None and len(self.acked) >= self.expected:
            self.all_acked.set()
        return removed


class NaiveClient:
    """The baselines' publisher: plain paho, MQTT v5, QoS 1, the agent's TLS context and identity.

    ``nodelay`` (the default) sets TCP_NODELAY, which neither paho nor mosquitto does: on
    loopback (64 KiB MSS) the short tail of a large publish otherwise waits for the broker's
    delayed ACK, about 40 ms, which would make stop-and-wait look worse than it is.
    """

    def __init__(self, settings: MqttSettings, *, max_inflight: int = WINDOW, nodelay: bool = True) -> None:
        self.settings = settings
        self.nodelay = nodelay
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=VEHICLE_ID, protocol=paho.MQTTv5)
        self.client.tls_set_context(build_tls_context(settings))
        self.client.max_inflight_messages_set(max_inflight)
        self.client.on_publish = self._on_publish
        self.acks: list[tuple[int, int]] = []  # (mid, monotonic ns), appended by paho's thread
        self.refused = 0
        self.published = 0
        self._threaded = False

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        self.acks.append((mid, time.monotonic_ns()))
        if reason_code.is_failure:
            self.refused += 1

    def connect(self) -> None:
        """Connect and wait for the CONNACK (driving the loop on this thread)."""
        self.client.connect(self.settings.host, self.settings.port, keepalive=60)
        sock = self.client.socket()
        if self.nodelay and isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + 30
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError("naive client: no CONNACK")
            self.client.loop(timeout=0.1)

    def start_background(self) -> None:
        self.client.loop_start()
        self._threaded = True

    def publish(self, payload: bytes) -> int:
        info = self.client.publish(TOPIC, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"naive publish failed: {paho.error_string(info.rc)}")
        self.published += 1
        return info.mid

    def publish_one_at_a_time(self, payloads: Sequence[bytes]) -> None:
        """Publish each payload and wait for its PUBACK before the next (stop-and-wait)."""
        deadline = time.monotonic() + WAIT_S
        for payload in payloads:
            target = len(self.acks) + 1
            self.publish(payload)
            while len(self.acks) < target:
                if time.monotonic() > deadline:
                    raise RuntimeError("naive client: PUBACK missing")
                self.client.loop(timeout=1.0)

    def publish_windowed(self, payloads: Sequence[bytes], window: int = WINDOW) -> None:
        """Keep up to ``window`` publishes in flight (the same window as the agent's)."""
        deadline = time.monotonic() + WAIT_S
        sent = 0
        base = len(self.acks)
        while len(self.acks) - base < len(payloads):
            while sent < len(payloads) and sent - (len(self.acks) - base) < window:
                self.publish(payloads[sent])
                sent += 1
            if time.monotonic() > deadline:
                raise RuntimeError("naive client: PUBACKs missing")
            self.client.loop(timeout=1.0)

    def wait_acked(self, count: int, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acks) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive client: {len(self.acks)} of {count} PUBACKs")
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        if self._threaded:
            self.client.loop_stop()
        else:
            with contextlib.suppress(Exception):
                self.client.loop(timeout=0.1)


def json_sample(sample: Sample) -> bytes:
    """The naive encoding: one JSON object per sample (as in bench/bench_outbox.py)."""
    return json.dumps({"vehicle": VEHICLE_ID, "signal": sample.signal, "ts": sample.ts_ns,
                       "value": sample.value}).encode()


def json_record(record: Record) -> list[bytes]:
    """What a naive publisher sends for one record: a message per sample, aggregate or event."""
    if isinstance(record, Sample):
        return [json_sample(record)]
    if isinstance(record, Aggregate):
        return [json.dumps({"vehicle": VEHICLE_ID, "signal": record.signal, "start": record.start_ns,
                            "end": record.end_ns, "values": record.values}).encode()]
    return [json.dumps({"vehicle": VEHICLE_ID, "event": record.rule, "ts": record.trigger_ts_ns,
                        "samples": [[s.signal, s.ts_ns, s.value] for s in record.samples]}).encode()]


# --------------------------------------------------------------------------- RTT emulation


async def _serve_delay_proxy(listen_port: int, upstream_port: int, one_way_s: float,
                             ready: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump_in() -> None:
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + one_way_s, data))
            queue.put_nowait((0.0, b""))

        async def pump_out() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pump_in(), pump_out())

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(accept, LOOPBACK, listen_port)
    ready()
    async with server:
        await server.serve_forever()


def delay_proxy_main(listen_port: int, upstream_port: int, rtt_ms: float) -> None:
    """Forward TCP ``listen_port`` -> ``upstream_port``, each direction delayed by RTT/2."""
    def ready() -> None:
        print("ready", flush=True)

    asyncio.run(_serve_delay_proxy(listen_port, upstream_port, rtt_ms / 2000, ready))


@contextlib.contextmanager
def delay_proxy(upstream_port: int, rtt_ms: float) -> Iterator[int]:
    """A delay proxy in its own process (so it does not share our GIL); yields its port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_uplink", "--delay-proxy",
                             str(port), str(upstream_port), str(rtt_ms)], cwd=REPO,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"delay proxy did not start (exit {proc.poll()})")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- 1. backlog drain


@dataclass(frozen=True)
class Backlog:
    """A closed outbox database holding ``batches`` telemetry batches."""

    path: Path
    seconds: int
    batches: int
    samples: int
    payload_bytes: int


def encode_seconds(count: int, seed: int = 5) -> list[list[EncodedBatch]]:
    """``count`` distinct seconds of busy-bus telemetry (~10,000 samples each), encoded as
    ``OutboxSink`` encodes one flush (zstd, <= 128 KiB payloads)."""
    vehicle = Vehicle(seed=seed)
    out = []
    for k in range(count):
        result = encode_records(vehicle.second(k), vehicle_id=VEHICLE_ID, boot_id=BACKLOG_BOOT_ID)
        if result.rejected:
            raise RuntimeError(f"encoder rejected {len(result.rejected)} records")
        out.append(result.batches)
    return out


def write_backlog(path: Path, encoded: Sequence[Sequence[EncodedBatch]], seconds: int) -> Backlog:
    """An outbox with ``seconds`` flushes, one commit each (as the sink does, once per second);
    the encoded seconds are reused in turn, each commit getting new sequence numbers."""
    settings = OutboxSettings(path=path)
    with Outbox(settings) as outbox:
        for k in range(seconds):
            outbox.commit([(Priority.TELEMETRY, b) for b in encoded[k % len(encoded)]])
        stats = outbox.stats()
    if stats.lost_total:
        raise RuntimeError(f"backlog did not fit the outbox: {stats.lost_total}")
    return Backlog(path, seconds, stats.batches["telemetry"], stats.samples["telemetry"],
                   stats.payload_bytes)


def backlog_payloads(backlog: Backlog) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(f"file:{backlog.path}?mode=ro", uri=True)) as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT payload FROM batches ORDER BY seq")]


def copy_outbox(backlog: Backlog, directory: Path) -> Path:
    """A fresh copy of the backlog database (and its sequence sidecar) for one run."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "outbox.sqlite"
    for suffix in ("", ".seq"):
        shutil.copy2(f"{backlog.path}{suffix}", f"{target}{suffix}")
    return target


@dataclass
class DrainRun:
    side: str
    batches: int
    samples: int
    payload_bytes: int
    seconds: float
    tcp: TcpCounters
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def payload_mb_per_s(self) -> float:
        return self.payload_bytes / self.seconds / 1e6

    @property
    def wire_bytes_per_sample(self) -> float:
        return self.tcp.sent / self.samples


def drain_agent(env: BenchEnv, backlog: Backlog, directory: Path, *, port: int | None = None,
                max_inflight: int = WINDOW) -> DrainRun:
    """Start the agent's uplink on a copy of the backlog; time from start to the last PUBACK."""
    settings = UplinkSettings(
        outbox=OutboxSettings(path=copy_outbox(backlog, directory)),
        mqtt=env.mqtt_settings(port, max_publishes_per_s=DRAIN_RATE_LIMIT, max_inflight=max_inflight))
    uplink = Uplink(settings, VEHICLE_ID)
    try:
        recorder = AckRecorder(uplink.outbox, expected=backlog.batches)
        started = time.monotonic_ns()
        uplink.start()
        if not recorder.all_acked.wait(WAIT_S):
            raise RuntimeError(f"agent acked {len(recorder.acked)} of {backlog.batches} batches")
        tcp = tcp_counters(settings.mqtt.port)
        left = sum(uplink.outbox.stats().batches.values())
        counters = uplink.publisher.counters()
    finally:
        uplink.close()
    if left or counters.denied or counters.rate_limited:
        raise RuntimeError(f"agent drain incomplete: {left} left, counters {counters}")
    seconds = (max(at for _, at in recorder.acks) - started) / NS
    return DrainRun("agent", backlog.batches, backlog.samples, backlog.payload_bytes, seconds, tcp,
                    {"ack_ms_per_batch": recorder.ack_ns / 1e6 / backlog.batches,
                     "pending_ms_per_batch": recorder.pending_ns / 1e6 / backlog.batches,
                     "published": counters.published})


def drain_naive_batches(env: BenchEnv, payloads: Sequence[bytes], samples: int, *,
                        port: int | None = None, nodelay: bool = True) -> DrainRun:
    """The same payloads, one at a time, each waiting for its PUBACK; no outbox."""
    settings = env.mqtt_settings(port)
    client = NaiveClient(settings, nodelay=nodelay)
    started = time.monotonic_ns()
    try:
        client.connect()
        client.publish_one_at_a_time(payloads)
        ended = client.acks[-1][1]
        tcp = tcp_counters(settings.port)
    finally:
        client.close()
    if client.refused or len(client.acks) != len(payloads):
        raise RuntimeError(f"naive: {len(client.acks)} acks, {client.refused} refused")
    return DrainRun("naive batches" if nodelay else "naive batches, Nagle", len(payloads), samples,
                    sum(map(len, payloads)), (ended - started) / NS, tcp)


def drain_naive_json(env: BenchEnv, samples: Sequence[Sample], *, port: int | None = None) -> DrainRun:
    """One JSON message per sample, QoS 1, the agent's window of publishes in flight."""
    settings = env.mqtt_settings(port)
    payloads = [json_sample(s) for s in samples]
    client = NaiveClient(settings)
    started = time.monotonic_ns()
    try:
        client.connect()
        client.publish_windowed(payloads)
        ended = client.acks[-1][1]
        tcp = tcp_counters(settings.port)
    finally:
        client.close()
    if client.refused or len(client.acks) != len(payloads):
        raise RuntimeError(f"naive json: {len(client.acks)} acks, {client.refused} refused")
    return DrainRun("naive json", len(payloads), len(samples), sum(map(len, payloads)),
                    (ended - started) / NS, tcp)


def first_samples(count: int, seed: int = 5) -> list[Sample]:
    """The first ``count`` samples of the backlog's data (same generator, same seed)."""
    vehicle = Vehicle(seed=seed)
    out: list[Sample] = []
    k = 0
    while len(out) < count:
        out.extend(r for r in vehicle.second(k) if isinstance(r, Sample))
        k += 1
    return out[:count]


# --------------------------------------------------------------------------- 2. latency


def heavy_profile(directory: Path) -> Path:
    """busy_bus.yaml plus one rule that sends every catalog signal on every change."""
    doc = yaml.safe_load(PROFILE.read_text(encoding="utf-8"))
    for bus in doc["buses"]:
        bus["databases"] = [str((PROFILE.parent / name).resolve()) for name in bus["databases"]]
    doc["rules"].append({"type": "on_change", "name": ALL_ON_CHANGE,
                         "signals": [s["name"] for s in doc["signals"]]})
    path = directory / "busy_bus_all_on_change.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


class JsonPerSampleSink:
    """The naive uplink: every record published at once as its own JSON message, QoS 1."""

    def __init__(self, client: NaiveClient) -> None:
        self.client = client
        self.sent: list[tuple[int, int | None]] = []  # (mid, ts_ns of a rule sample or None)
        self.payload_bytes = 0
        self.closed = False

    def emit(self, records: list[Record]) -> None:
        for record in records:
            ts = record.ts_ns if isinstance(record, Sample) else None
            for payload in json_record(record):
                self.sent.append((self.client.publish(payload), ts))
                self.payload_bytes += len(payload)

    def close(self) -> None:
        self.closed = True


@dataclass
class LatencyRun:
    side: str
    seconds: float
    frames: int
    samples: int  # rule samples on the telemetry stream (the latency population)
    other_records: int  # aggregates and events, sent but not in the latency figures
    publishes: int
    payload_bytes: int
    tcp: TcpCounters
    per_batch_ms: list[float]  # oldest sample of each batch to its PUBACK
    per_sample_ms: list[float]
    commit_to_ack_ms: list[float]  # batch stored in the outbox -> its PUBACK

    @property
    def publishes_per_s(self) -> float:
        return self.publishes / self.seconds

    @property
    def wire_bytes_per_s(self) -> float:
        return self.tcp.sent / self.seconds


def send_paced(channel: str, frames: Sequence[can.Message], stop: threading.Event) -> int:
    """Send ``frames`` on a virtual bus at their timestamps (seconds from the start)."""
    bus = can.Bus(interface="virtual", channel=channel)
    sent = 0
    try:
        start = time.monotonic()
        for frame in frames:
            delay = start + frame.timestamp - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            bus.send(frame)
            sent += 1
    finally:
        bus.shutdown()
    return sent


def _run_pipeline(profile: LoadedProfile, sink: Any, frames: Sequence[can.Message],
                  channel: str) -> tuple[Pipeline, int, float]:
    """Run the real collection pipeline on a virtual bus while the frames are sent in real time."""
    pipeline = Pipeline(profile, sink, {BUS: BusOverride(interface="virtual", channel=channel)},
                        PipelineSettings(CanSettings(), ClockSettings(synced="assume_synced")))
    runner = threading.Thread(target=pipeline.run, name="bench-pipeline", daemon=True)
    runner.start()
    if not pipeline.wait_ready(30):
        pipeline.stop()
        raise RuntimeError("pipeline bus did not open")
    stop = threading.Event()
    started = time.monotonic()
    try:
        sent = send_paced(channel, frames, stop)
    finally:
        stop.set()
        pipeline.stop()
        runner.join(60)
    return pipeline, sent, time.monotonic() - started


def latency_agent(env: BenchEnv, profile: LoadedProfile, frames: Sequence[can.Message],
                  directory: Path) -> LatencyRun:
    """Frames -> Pipeline -> the agent's Uplink (default settings: 1 s flush, 50 publishes/s)."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = UplinkSettings(outbox=OutboxSettings(path=directory / "outbox.sqlite"),
                              mqtt=env.mqtt_settings())
    uplink = Uplink(settings, VEHICLE_ID)
    try:
        recorder = AckRecorder(uplink.outbox, keep_payloads=True)
        uplink.start()
        deadline = time.monotonic() + 30
        while not uplink.publisher.connected:
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not connect")
            time.sleep(0.01)
        published0 = uplink.publisher.counters().published
        tcp0 = tcp_counters(env.port)
        pipeline, sent, seconds = _run_pipeline(profile, uplink.sink, frames,
                                                f"bench-uplink-agent-{os.getpid()}")
        committed = uplink.sink.stats.batches_committed
        deadline = time.monotonic() + WAIT_S
        while len(recorder.acked) < committed:
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent acked {len(recorder.acked)} of {committed} batches")
            time.sleep(0.01)
        tcp = tcp_counters(env.port) - tcp0
        published = uplink.publisher.counters().published - published0
    finally:
        uplink.close()
    per_batch: list[float] = []
    per_sample: list[float] = []
    commit_to_ack: list[float] = []
    samples = other = payload_bytes = 0
    for seq, ack_mono_ns in recorder.acks:
        payload = recorder.payloads[seq]
        payload_bytes += len(payload)
        batch = decode_batch(payload)
        other += len(batch.aggregates) + len(batch.events)
        stamps = [s.ts_ns for s in batch.samples]
        if not stamps:
            continue
        acked_wall = pipeline.clock.wall_ns(ack_mono_ns / NS)
        per_batch.append((acked_wall - min(stamps)) / 1e6)
        commit_to_ack.append((ack_mono_ns - recorder.committed[seq]) / 1e6)
        per_sample.extend((acked_wall - ts) / 1e6 for ts in stamps)
        samples += len(stamps)
    return LatencyRun("agent", seconds, sent, samples, other, published, payload_bytes, tcp,
                      per_batch, per_sample, commit_to_ack)


def latency_naive(env: BenchEnv, profile: LoadedProfile, frames: Sequence[can.Message]) -> LatencyRun:
    """Frames -> Pipeline -> a JSON message per sample, QoS 1, published as it is emitted."""
    client = NaiveClient(env.mqtt_settings())
    client.connect()
    client.start_background()
    sink = JsonPerSampleSink(client)
    try:
        tcp0 = tcp_counters(env.port)
        pipeline, sent, seconds = _run_pipeline(profile, sink, frames,
                                                f"bench-uplink-naive-{os.getpid()}")
        client.wait_acked(len(sink.sent))
        tcp = tcp_counters(env.port) - tcp0
    finally:
        client.close()
    if client.refused:
        raise RuntimeError(f"broker refused {client.refused} naive publishes")
    # PUBACKs name the message id; ids are unique while in flight, so match them in order.
    outstanding: dict[int, deque[int | None]] = defaultdict(deque)
    for mid, ts in sink.sent:
        outstanding[mid].append(ts)
    per_sample: list[float] = []
    for mid, ack_mono_ns in client.acks:
        ts = outstanding[mid].popleft()
        if ts is not None:
            per_sample.append((pipeline.clock.wall_ns(ack_mono_ns / NS) - ts) / 1e6)
    return LatencyRun("naive", seconds, sent, len(per_sample), len(sink.sent) - len(per_sample),
                      len(sink.sent), sink.payload_bytes, tcp, per_sample, per_sample, [])


# --------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Plan:
    backlog_seconds: int  # seconds of 10,000 samples/s telemetry in the drained outbox
    distinct_seconds: int  # of which encoded from distinct data
    json_samples: int  # JSON-per-sample drain: measured on this many samples
    nagle_batches: int  # stop-and-wait with paho's defaults (Nagle on): this many batches
    rounds: int
    rtt_ms: float  # emulated round trip; 0: skip
    rtt_backlog_seconds: int
    rtt_json_samples: int
    latency_seconds: float  # frames -> PUBACK, every signal on change
    shipped_latency_seconds: float  # frames -> PUBACK, the shipped busy_bus rules

    @classmethod
    def full(cls) -> Plan:
        return cls(600, 60, 20_000, 20, 3, 50.0, 120, 1_000, 30.0, 15.0)

    @classmethod
    def quick(cls) -> Plan:
        return cls(120, 20, 5_000, 10, 1, 50.0, 40, 300, 10.0, 10.0)


@dataclass
class Report:
    plan: Plan
    command: str
    backlog: Backlog
    rtt_backlog: Backlog
    loopback: dict[str, list[DrainRun]]
    rtt: dict[str, list[DrainRun]]
    latency: dict[str, dict[str, LatencyRun]]  # load -> side -> run
    machine: str
    seconds: float = 0.0


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median_run(runs: Sequence[DrainRun]) -> DrainRun:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def machine_facts() -> str:
    import ssl

    import paho.mqtt

    model = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        mosquitto = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False,
                                   timeout=10).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosquitto = "mosquitto"
    return (f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, paho-mqtt {paho.mqtt.__version__}, {mosquitto}, "
            f"{ssl.OPENSSL_VERSION}, SQLite {sqlite3.sqlite_version}")


def run_benchmark(plan: Plan, command: str, progress: Callable[[str], None] = print) -> Report:
    from bench.traffic import generate

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp:
        root = Path(tmp)
        progress(f"encoding {plan.distinct_seconds} distinct seconds of busy-bus telemetry ...")
        encoded = encode_seconds(plan.distinct_seconds)
        backlog = write_backlog(root / "backlog" / "outbox.sqlite", encoded, plan.backlog_seconds)
        rtt_backlog = write_backlog(root / "rtt-backlog" / "outbox.sqlite", encoded,
                                    plan.rtt_backlog_seconds)
        progress(f"backlog: {backlog.batches} batches, {backlog.samples:,} samples, "
                 f"{backlog.payload_bytes / 1e6:.1f} MB")
        payloads = backlog_payloads(backlog)
        per_batch = backlog.samples / backlog.batches
        nagle_payloads = payloads[:plan.nagle_batches]
        rtt_payloads = backlog_payloads(rtt_backlog)
        json_samples = first_samples(plan.json_samples)
        rtt_json_samples = json_samples[:plan.rtt_json_samples]
        with BenchEnv(root / "env") as env:
            loopback: dict[str, list[DrainRun]] = defaultdict(list)
            for i in range(plan.rounds):
                loopback["agent"].append(drain_agent(env, backlog, root / f"drain-{i}"))
                loopback["naive batches"].append(drain_naive_batches(env, payloads, backlog.samples))
                loopback["naive batches, Nagle"].append(drain_naive_batches(
                    env, nagle_payloads, round(per_batch * len(nagle_payloads)), nodelay=False))
                loopback["naive json"].append(drain_naive_json(env, json_samples))
                progress(f"loopback drain {i + 1}/{plan.rounds}: " + ", ".join(
                    f"{side} {runs[-1].samples_per_s:,.0f} samples/s" for side, runs in loopback.items()))
            rtt: dict[str, list[DrainRun]] = defaultdict(list)
            if plan.rtt_ms > 0:
                with delay_proxy(env.port, plan.rtt_ms) as proxy_port:
                    for i in range(plan.rounds):
                        rtt["agent"].append(drain_agent(env, rtt_backlog, root / f"rtt-{i}",
                                                        port=proxy_port))
                        rtt["naive batches"].append(drain_naive_batches(
                            env, rtt_payloads, rtt_backlog.samples, port=proxy_port))
                        rtt["naive json"].append(drain_naive_json(env, rtt_json_samples,
                                                                  port=proxy_port))
                        progress(f"{plan.rtt_ms:g} ms RTT drain {i + 1}/{plan.rounds}: " + ", ".join(
                            f"{side} {runs[-1].samples_per_s:,.0f} samples/s" for side, runs in rtt.items()))
            latency: dict[str, dict[str, LatencyRun]] = {}
            loads = [("every signal on change", heavy_profile(root), plan.latency_seconds),
                     ("busy_bus rules as shipped", PROFILE, plan.shipped_latency_seconds)]
            for name, path, seconds in loads:
                if seconds <= 0:
                    continue
                profile = load_profile(path)
                frames = generate(profile, seconds)
                latency[name] = {
                    "agent": latency_agent(env, profile, frames, root / f"latency-{len(latency)}"),
                    "naive": latency_naive(env, profile, frames),
                }
                progress(f"latency, {name}: " + ", ".join(
                    f"{side} per-sample p50 {pct(r.per_sample_ms, 50):.0f} ms, "
                    f"{r.publishes_per_s:.1f} publishes/s" for side, r in latency[name].items()))
    return Report(plan, command, backlog, rtt_backlog, dict(loopback), dict(rtt), latency,
                  machine_facts(), time.monotonic() - started)


# --------------------------------------------------------------------------- markdown

LIVE_SAMPLES_PER_S = 10_000
SIDE_LABELS = {
    "agent": f"agent: `Uplink` (SQLite outbox, {WINDOW} in flight, acked batches deleted once per loop turn)",
    "naive batches": "naive: same payloads one at a time, wait for each PUBACK (TCP_NODELAY)",
    "naive batches, Nagle": "naive, paho defaults (Nagle on): one at a time",
    "naive json": f"naive: JSON message per sample, QoS 1, {WINDOW} in flight (TCP_NODELAY)",
}


def _table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|---" + "|---:" * (len(rows[0]) - 1) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return out


def _drain_table(runs: dict[str, list[DrainRun]], backlog: Backlog) -> list[str]:
    rows = [["", "batches/s", "samples/s", "payload MB/s", "TLS bytes sent / sample",
             "time for the whole backlog", "each run (s)", "agent / this, samples/s"]]
    agent = median_run(runs["agent"])
    for side, side_runs in runs.items():
        run = median_run(side_runs)
        whole = backlog.samples / run.samples_per_s
        note = "" if run.samples == backlog.samples else f" (measured on {run.samples:,} samples)"
        rows.append([SIDE_LABELS[side], "-" if side == "naive json" else f"{run.batches_per_s:,.1f}",
                     f"{run.samples_per_s:,.0f}", f"{run.payload_mb_per_s:.2f}",
                     f"{run.wire_bytes_per_sample:.2f}", f"{whole:,.1f} s{note}",
                     ", ".join(f"{r.seconds:.2f}" for r in side_runs),
                     "" if side == "agent" else f"{agent.samples_per_s / run.samples_per_s:,.2f}x"])
    return _table(rows)


def render(report: Report) -> str:
    plan, backlog = report.plan, report.backlog
    lines = [
        "## Uplink (issue 3)",
        "",
        "```",
        report.command,
        "```",
        "",
        f"Machine: {report.machine}. The whole run took {report.seconds:.0f} s. The machine is "
        "shared and noisy, and everything runs on it at once (mosquitto, the publisher, the CAN "
        "sender): compare the sides within one run.",
        "",
        "All traffic is MQTT v5 over mutual TLS to a local mosquitto started by the benchmark "
        "(`tests.broker.MosquittoBroker`: dev PKI, the demo's ACL; no subscriber, so the broker "
        "acknowledges and discards). The agent side is the real `agent.uplink.service.Uplink`; a "
        "wrapper around its outbox's `commit`, `pending` and `ack` notes when each batch is stored "
        "and when its PUBACK arrives (no agent code changed). The baselines are plain "
        "paho clients with the agent's own TLS context (`build_tls_context`) and identity; they get "
        "TCP_NODELAY, which neither paho nor mosquitto sets, because on loopback (64 KiB segments) "
        "the short tail of a large publish otherwise waits for a delayed ACK (the `Nagle` row shows "
        "what that costs). Bytes on the wire are the TCP payload bytes of the MQTT connection from "
        "the kernel's `TCP_INFO` (`tcpi_bytes_acked`, client to broker): TLS records carrying the "
        "MQTT packets, plus the TLS handshake and CONNECT; TCP/IP headers are not counted.",
        "",
        "### Backlog drain",
        "",
        f"Backlog: {backlog.seconds} s of busy-bus telemetry (10,000 samples/s: 900 signals at "
        "10 Hz, 1,000 at 1 Hz, the generator of bench/bench_outbox.py) committed as `OutboxSink` "
        "commits it, one batch per 1 s flush: "
        f"{backlog.batches} batches, {backlog.samples:,} samples, "
        f"{backlog.payload_bytes / 1e6:.1f} MB of zstd CBOR payloads "
        f"({backlog.payload_bytes / backlog.batches / 1024:.0f} KiB per batch). "
        f"{plan.distinct_seconds} distinct seconds are encoded and reused in turn under new "
        "sequence numbers (for the transport only the payload sizes matter). The agent's publisher "
        "starts on a fresh copy of that outbox (`synchronous: full`, the default) with "
        f"`max_publishes_per_s` raised to {DRAIN_RATE_LIMIT:,.0f} for this benchmark only (default: "
        f"{DEFAULT_RATE_LIMIT:g} per stream) and is timed from `start()` (TLS connect included) to "
        "the last PUBACK; the baselines from `connect()` to their last PUBACK. Rows measured on a "
        "part of the data are extrapolated to the whole backlog in the time column. Medians of "
        f"{plan.rounds} interleaved runs.",
        "",
        "Loopback, no added delay:",
        "",
        *_drain_table(report.loopback, backlog),
        "",
    ]
    if report.rtt:
        rb = report.rtt_backlog
        lines += [
            f"Through a delay proxy adding {plan.rtt_ms:g} ms of round trip (a cellular link: "
            f"{plan.rtt_ms / 2:g} ms each way, no bandwidth limit; a separate process forwarding "
            f"TCP, so TLS stays end to end), on the first {rb.seconds} s of the backlog "
            f"({rb.batches} batches, {rb.samples:,} samples):",
            "",
            *_drain_table(report.rtt, rb),
            "",
        ]
    lines += [
        "### Latency from CAN frame to PUBACK",
        "",
        "The real ingest path in one process: busy-bus frames (bench/traffic.py: the simulator's "
        "ECUs, ~3,900 frames/s) sent in real time on a python-can `virtual` bus -> `Pipeline` "
        "(`FrameProcessor`, `RuleEngine`) -> sink. Agent: the `Uplink` with default settings "
        "(`flush_interval_ms: 1000`, `synchronous: full`, zstd, 16 in flight, 50 publishes/s per "
        "stream). Naive: a sink that publishes every sample as its own JSON message with QoS 1 "
        "the moment the rules emit it (an aggregate or event as one message). Latency = PUBACK "
        "time - `ts_ns` of the sample, the wall-clock time its frame was received, both on the "
        "pipeline's clock. Per batch: the oldest sample of each batch, and the publisher's share "
        "alone, from the commit that stored the batch to its PUBACK; per sample: every sample "
        "(weighted by samples). With one batch per second, a batch p99 is about the worst batch "
        "of the run. Samples of the rules only: aggregates (10 s windows) "
        "and event captures are sent by both sides but not in the latency figures. Two rule sets "
        "on the same bus: the shipped busy_bus.yaml (~15 samples/s), and the same plus one "
        "`on_change` rule over all 32 catalog signals (~500 samples/s).",
        "",
    ]
    rows = [["rules (run length, frames sent)", "side", "samples", "oldest in batch p50 / p99 ms",
             "commit -> PUBACK p50 / p99 ms", "per sample p50 / p99 / max ms", "publishes/s",
             "TLS bytes/s sent", "TLS bytes sent per record"]]
    for load, sides in report.latency.items():
        for side, run in sides.items():
            def p(values: list[float]) -> str:
                return f"{pct(values, 50):,.0f} / {pct(values, 99):,.0f}"
            rows.append([f"{load} ({run.seconds:.0f} s, {run.frames:,})", side, f"{run.samples:,}",
                         p(run.per_batch_ms) if side == "agent" else "-",
                         p(run.commit_to_ack_ms) if side == "agent" else "-",
                         f"{pct(run.per_sample_ms, 50):,.1f} / {pct(run.per_sample_ms, 99):,.1f} / "
                         f"{max(run.per_sample_ms):,.0f}",
                         f"{run.publishes_per_s:,.1f}", f"{run.wire_bytes_per_s:,.0f}",
                         f"{run.tcp.sent / max(1, run.samples + run.other_records):.1f}"])
    lines += _table(rows)
    lines += ["", reading(report), ""]
    return "\n".join(lines)


def reading(report: Report) -> str:
    b, live = report.backlog, LIVE_SAMPLES_PER_S
    agent, naive_b, naive_j = (median_run(report.loopback[k])
                               for k in ("agent", "naive batches", "naive json"))
    nagle = median_run(report.loopback["naive batches, Nagle"])
    vs_batches = agent.samples_per_s / naive_b.samples_per_s
    bookkeeping = (f"{agent.extra['ack_ms_per_batch']:.2f} ms per batch to delete acknowledged "
                   "batches (one fsynced SQLite transaction per publisher loop turn) and "
                   f"{agent.extra['pending_ms_per_batch']:.2f} ms to read the next ones from the outbox")
    parts = [
        f"Reading: on loopback the agent drains {b.seconds} s of busy-bus backlog in "
        f"{b.samples / agent.samples_per_s:.1f} s ({agent.samples_per_s / live:,.0f}x real time, "
        f"{agent.payload_mb_per_s:.0f} MB/s of payload).",
    ]
    if vs_batches >= 1:
        parts.append(
            f"Publishing the same batches one at a time is {vs_batches:.1f}x slower even here, where "
            f"a round trip costs almost nothing, although the agent also spends {bookkeeping}.")
    else:
        parts.append(
            f"Here, where a round trip costs almost nothing, publishing the same batches one at a "
            f"time is {1 / vs_batches:.1f}x faster than the agent: it does nothing but publish, "
            f"while the agent spends {bookkeeping}: the price of durability (a batch leaves the "
            "outbox only once the broker has acknowledged it, and is then never sent again). On "
            "loopback the agent is bound by that bookkeeping, not by the link.")
    parts.append(
        f"Stop-and-wait with paho's defaults (Nagle on) is {agent.samples_per_s / nagle.samples_per_s:.0f}x "
        "slower than the agent: every publish then waits ~40 ms for a delayed ACK. A JSON message "
        f"per sample manages {naive_j.samples_per_s:,.0f} samples/s "
        f"({naive_j.samples_per_s / live:.1f}x real time, {agent.samples_per_s / naive_j.samples_per_s:,.0f}x "
        f"slower than the agent) and puts {naive_j.wire_bytes_per_sample / agent.wire_bytes_per_sample:.0f}x "
        f"the bytes on the wire ({naive_j.wire_bytes_per_sample:.0f} against "
        f"{agent.wire_bytes_per_sample:.1f} TLS bytes per sample, all overhead included).")
    if report.rtt:
        r_agent, r_naive_b, r_naive_j = (median_run(report.rtt[k])
                                         for k in ("agent", "naive batches", "naive json"))
        rtt = report.plan.rtt_ms
        parts.append(
            f"Over a {rtt:g} ms round trip the window is what counts: with {WINDOW} batches in "
            f"flight the agent drains {r_agent.batches_per_s:,.0f} batches/s "
            f"({r_agent.samples_per_s / live:,.0f}x real time, TLS and MQTT connect included), "
            f"stop-and-wait {r_naive_b.batches_per_s:,.1f} batches/s "
            f"({r_agent.samples_per_s / r_naive_b.samples_per_s:.1f}x slower; it can never beat "
            f"1000/{rtt:g} = {1000 / rtt:g} per second whatever the bandwidth), and JSON per sample "
            f"{r_naive_j.samples_per_s:,.0f} samples/s, "
            f"{'far below' if r_naive_j.samples_per_s < live / 2 else 'about'} the {live:,} samples/s "
            "this bus produces: a device publishing that way falls behind live data and never "
            "catches up on a backlog.")
    parts.append(
        f"With the publisher's default limit of {DEFAULT_RATE_LIMIT:g} publishes/s per stream the "
        f"drain is capped at {DEFAULT_RATE_LIMIT:g} batches/s: {b.batches / DEFAULT_RATE_LIMIT:.0f} s "
        f"for this backlog, still {DEFAULT_RATE_LIMIT * b.samples / b.batches / live:.0f}x real time.")
    for load, sides in report.latency.items():
        a, n = sides["agent"], sides["naive"]
        to_ack = pct(a.commit_to_ack_ms, 50)
        poll = (f"; most of that is the publisher's idle poll of the outbox (every "
                f"{POLL_S * 1000:.0f} ms), not the network" if to_ack > POLL_S * 1000 / 4 else "")
        parts.append(
            f"Latency ({load}): the agent keeps a sample in memory for up to one flush interval "
            f"(1 s), so the median sample is acknowledged {pct(a.per_sample_ms, 50):,.0f} ms after "
            f"its frame (p99 {pct(a.per_sample_ms, 99):,.0f}), against {pct(n.per_sample_ms, 50):,.0f} ms "
            f"(p99 {pct(n.per_sample_ms, 99):,.0f}) for naive per-sample publishing. Once a batch is "
            f"committed the publisher has it acknowledged {to_ack:,.0f} ms later "
            f"(p99 {pct(a.commit_to_ack_ms, 99):,.0f}){poll}. The oldest sample of a batch "
            f"({pct(a.per_batch_ms, 50):,.0f} ms, p99 {pct(a.per_batch_ms, 99):,.0f}) has waited a whole "
            "flush interval plus however long the rules held it before the sink saw it: a periodic "
            "rule stamps a value with the receive time "
            "of its frame, up to one period (1 s for `status_1hz`) before it emits it, and an "
            "`on_change` rule with `min_interval_ms` (`coolant_step`: 10 s) emits a held change with "
            "its original time. The naive side gets the same samples (its oldest is acknowledged "
            f"{max(n.per_sample_ms):,.0f} ms after its frame, the agent's {max(a.per_sample_ms):,.0f} ms). "
            f"For its lower latency the naive side makes "
            f"{n.publishes_per_s / max(a.publishes_per_s, 1e-9):,.0f}x the publishes "
            f"({n.publishes_per_s:,.0f}/s against {a.publishes_per_s:.1f}/s) and sends "
            f"{n.wire_bytes_per_s / max(a.wire_bytes_per_s, 1e-9):.1f}x the bytes "
            f"({n.wire_bytes_per_s / 1000:,.1f} kB/s against {a.wire_bytes_per_s / 1000:,.1f} kB/s), "
            "and it keeps nothing: a sample emitted while the link is down is gone.")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_uplink",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller backlog, one round, 10 s latency runs (about a minute)")
    parser.add_argument("--markdown", help="also write the markdown section to this file")
    parser.add_argument("--delay-proxy", nargs=3, metavar=("LISTEN", "UPSTREAM", "RTT_MS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.delay_proxy:
        listen, upstream, rtt = args.delay_proxy
        with contextlib.suppress(KeyboardInterrupt):
            delay_proxy_main(int(listen), int(upstream), float(rtt))
        return 0
    from agent.logs import configure_logging

    configure_logging("error")  # connection and outbox info lines are not results
    # --markdown only says where the text goes (a temp file under `python -m bench`)
    command = ".venv/bin/python -m bench.bench_uplink" + (" --quick" if args.quick else "")
    report = run_benchmark(Plan.quick() if args.quick else Plan.full(), command)
    text = render(report)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
