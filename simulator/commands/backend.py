"""``telematics-sim backend``: watch the fleet's uplink arrive, decoded and accounted for.

Connects to the broker with a backend identity (mutual TLS, MQTT v5), prints one line
per batch (live values, events highlighted, duplicates, gaps and rejected payloads),
optionally writes every record as a JSON line, and ends with a per-vehicle accounting
summary (batches, duplicates, missing sequence numbers), also as JSON with ``--stats``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from agent.errors import EX_CONFIG, ConfigError
from agent.records import Aggregate, Event
from simulator.backend import (
    BackendMonitor,
    BatchArrival,
    ConnectionChange,
    MonitorSnapshot,
    Rejection,
    StatusArrival,
    VehicleSnapshot,
    format_ranges,
    format_value,
    last_values,
)
from simulator.commands import backend_command
from simulator.commands.common import (
    EX_CANTCREAT,
    EX_UNAVAILABLE,
    EX_USAGE,
    error,
    positive_float,
    stop_on_signals,
)

MAX_VALUES_SHOWN = 8
OLD_DATA_S = 5.0  # batches whose newest record is older than this get its age shown


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_subparser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "backend", help="receive and decode the fleet's uplink, with sequence accounting",
        description="Subscribe to PREFIX/+/telemetry, events and status with a backend identity "
                    "(mutual TLS, MQTT v5), decode every batch, show it live and account for "
                    "sequence numbers per vehicle: duplicates, missing batches, rejected payloads.")
    conn = parser.add_argument_group("broker and identity")
    conn.add_argument("--host", default="127.0.0.1",
                      help="broker host name; must match its certificate (default 127.0.0.1)")
    conn.add_argument("--port", type=port_number, default=8883, help="broker port (default 8883)")
    conn.add_argument("--pki", metavar="DIR",
                      help="take --ca DIR/ca.crt, --cert DIR/NAME.crt and --key DIR/NAME.key")
    conn.add_argument("--name", default="backend",
                      help="identity name inside --pki (default backend)")
    conn.add_argument("--ca", metavar="CA", help="fleet CA certificate (PEM)")
    conn.add_argument("--cert", metavar="CRT", help="backend certificate; its CN is the client id")
    conn.add_argument("--key", metavar="KEY", help="backend private key (mode 0600)")
    conn.add_argument("--prefix", default="vt", help="topic prefix (default vt)")
    conn.add_argument("--session-expiry", type=non_negative_int, default=3600, metavar="S",
                      help="keep the broker session (and queue batches for us) S seconds after a "
                           "disconnect; 0 = clean session (default 3600)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.jsonl",
                     help="write every record as a JSON line (record_to_json + vehicle_id, seq)")
    out.add_argument("--stats", metavar="FILE.json", help="write the final accounting as JSON")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no live lines; only the final summary")
    out.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="highlight events and problems (default auto: on a terminal, "
                          "unless NO_COLOR is set)")
    parser.add_argument("--duration", type=positive_float, metavar="S",
                        help="stop after S seconds (default: until SIGINT/SIGTERM)")
    parser.set_defaults(func=run, _parser=parser)
    backend_command.add_subparser(parser)  # `backend ... command`: send a signed remote command


# --------------------------------------------------------------------------- live display


class Style:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def event(self, text: str) -> str:
        return self._wrap("1;31", text)

    def warn(self, text: str) -> str:
        return self._wrap("33", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def good(self, text: str) -> str:
        return self._wrap("32", text)


def clock(ts_ns: int | float, millis: bool = False) -> str:
    seconds = ts_ns / 1e9
    text = time.strftime("%H:%M:%S", time.localtime(seconds))
    return f"{text}.{int(seconds * 1000) % 1000:03d}" if millis else text


def duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short_signal(name: str) -> str:
    return name.removeprefix("Vehicle.")


def losses_text(losses: dict[str, dict[str, dict[str, int]]]) -> str:
    return ", ".join(f"{cls} {cause} {a['batches']} batches/{a['samples']} samples"
                     for cls, causes in sorted(losses.items()) for cause, a in sorted(causes.items()))


class LiveView:
    """Turns arrivals into terminal lines (and JSON lines); called on the monitor's thread."""

    def __init__(self, out: IO[str], style: Style, *, quiet: bool,
                 records_out: IO[str] | None) -> None:
        self.out = out
        self.style = style
        self.quiet = quiet
        self.records_out = records_out
        self.width = max(60, shutil.get_terminal_size((120, 24)).columns)
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def _head(self, arrival_time: float, vehicle_id: str) -> str:
        return f"{self.style.dim(clock(arrival_time * 1e9))} {self.style.bold(vehicle_id)}"

    def _fit(self, text: str, indent: int) -> str:
        room = self.width - indent
        return text if len(text) <= room else text[: room - 1] + "…"

    def on_batch(self, a: BatchArrival) -> None:
        if self.records_out is not None and a.delivered:
            text = "".join(json.dumps(d.to_json(a.vehicle_id), separators=(",", ":")) + "\n"
                           for d in a.delivered)
            with self._lock:
                self.records_out.write(text)
                self.records_out.flush()
        if self.quiet:
            return
        s = self.style
        head = f"{self._head(a.received_at, a.vehicle_id)} #{a.seq}"
        if a.duplicate:
            what = "DIFFERENT PAYLOAD, agent bug" if a.conflict else "already received, ignored"
            self.say(f"{head} " + (s.event if a.conflict else s.dim)(f"duplicate ({what})"))
            return
        notes = []
        if a.backlog:
            notes.append("backlog")
        if a.gap_filled:
            notes.append("fills gap")
        note = s.dim(f" ({', '.join(notes)})") if notes else ""
        batch = a.batch
        newest = max((r.ts_ns for r in batch.samples),
                     default=max((r.end_ns for r in batch.aggregates),
                                 default=max((e.trigger_ts_ns for e in batch.events), default=0)))
        age = a.received_at - newest / 1e9
        when = f" · data {clock(newest)}" + (f" ({duration_text(age)} old)" if age > OLD_DATA_S else "")
        lines = []
        if batch.stream == "telemetry":
            counts = plural(batch.counts.samples, "sample")
            if batch.counts.aggregates:
                counts += ", " + plural(batch.counts.aggregates, "aggregate")
            lines.append(f"{head} telemetry {counts}{s.dim(when)}{note}")
            values = [f"{short_signal(k)} {format_value(v)}" for k, v in last_values(batch).items()]
            values += [self._aggregate(g) for g in batch.aggregates[:MAX_VALUES_SHOWN]]
            if values:
                shown = values[:MAX_VALUES_SHOWN]
                more = f" · +{len(values) - len(shown)}" if len(values) > len(shown) else ""
                lines.append("    " + self._fit(" · ".join(shown) + more, 4))
        else:
            lines.append(f"{head} events batch{note}")
            for event, part in zip(batch.events, batch.event_parts, strict=True):
                lines.append("    " + self._event(event, part.index, part.count))
            for d in a.delivered:
                if d.part_seqs and isinstance(d.record, Event):
                    lines.append("    " + s.event("event complete") + " " + self._event(
                        d.record, 0, 1) + s.dim(f" (parts in #{', #'.join(map(str, d.part_seqs))})"))
        if a.gap_opened is not None:
            lo, hi = a.gap_opened
            lines.append("    " + s.warn(f"gap: #{format_ranges([(lo, hi)])} not received (yet); "
                                       f"{a.missing_now} missing now"))
        self.say("\n".join(lines))

    def _aggregate(self, g: Aggregate) -> str:
        stats = " ".join(f"{k}={format_value(v)}" for k, v in list(g.values.items())[:4])
        return f"{short_signal(g.signal)}[{(g.end_ns - g.start_ns) / 1e9:g} s] {stats}"

    def _event(self, event: Event, index: int, count: int) -> str:
        signals = len({x.signal for x in event.samples})
        part = f" part {index + 1}/{count}" if count > 1 else ""
        title = self.style.event(f"EVENT {event.rule}{part}")
        return self._fit(f"{title} at {clock(event.trigger_ts_ns, millis=True)} "
                         f"when {event.condition} · {plural(signals, 'signal')}, "
                         f"{plural(len(event.samples), 'sample')}",
                         4)

    def on_status(self, a: StatusArrival) -> None:
        if self.quiet:
            return
        s = self.style
        head = self._head(a.received_at, a.vehicle_id)
        if a.status is None:
            self.say(f"{head} status cleared")
            return
        state = str(a.status.get("state"))
        parts = [(s.good if state == "online" else s.warn)(state)]
        outbox = a.status.get("outbox")
        if isinstance(outbox, dict) and "batches" in outbox:
            parts.append(f"outbox {outbox['batches']}")
        boot = a.status.get("boot_id")
        if isinstance(boot, str):
            parts.append(f"boot {boot[:8]}")
        if a.retained:
            parts.append(s.dim("retained"))
        line = f"{head} status " + " · ".join(parts)
        if a.losses:
            line += "\n    " + s.warn("agent reports losses: " + losses_text(a.losses))
        self.say(line)

    def on_rejected(self, r: Rejection) -> None:
        if not self.quiet:
            self.say(f"{self._head(r.received_at, r.vehicle_id or '?')} " + self.style.warn(
                f"REJECTED {r.topic} ({r.size} B): {r.reason}: {r.detail}"))

    def on_connection(self, c: ConnectionChange) -> None:
        if c.state in ("connected", "subscribed"):
            if not self.quiet:
                self.say(self.style.dim(f"backend: {c.state} {c.detail}"))
            return
        retry = f"; retrying in {c.retry_in_s:.1f} s" if c.retry_in_s is not None else ""
        cause = c.failure.cause if c.failure else c.state
        print(f"telematics-sim backend: {c.state}: {cause}: {c.detail}{retry}", file=sys.stderr,
              flush=True)


# --------------------------------------------------------------------------- summary


def summary_lines(snap: MonitorSnapshot, elapsed_s: float) -> list[str]:
    lines = [f"backend summary after {elapsed_s:.1f} s: {len(snap.vehicles)} vehicle(s)"]
    if not snap.vehicles:
        lines.append("  nothing received")
    header = (f"  {'vehicle':<20} {'batches':>7} {'dup':>4} {'missing':>7} {'samples':>9} "
              f"{'aggr':>6} {'events':>6} {'rejected':>8}  status")
    if snap.vehicles:
        lines.append(header)
    for vid, v in sorted(snap.vehicles.items()):
        lines.append(f"  {vid:<20} {v.batches:>7} {v.duplicates:>4} {v.missing:>7} {v.samples:>9} "
                     f"{v.aggregates:>6} {v.events:>6} {sum(v.rejected.values()):>8}  {v.state}")
        lines.extend(f"      {x}" for x in vehicle_details(v))
    if snap.connection is not None and (snap.connection.connect_failures
                                        or snap.connection.disconnects):
        c = snap.connection
        lines.append(f"  connection: {c.connects} connects, failures {c.connect_failures}, "
                     f"disconnects {c.disconnects}")
    return lines


def vehicle_details(v: VehicleSnapshot) -> list[str]:
    out = []
    if v.first_seq is not None:
        out.append(f"seq #{v.first_seq}..#{v.last_seq}")
    if v.missing_ranges:
        text = f"missing #{format_ranges(v.missing_ranges)}"
        if v.missing_at_boot_changes:
            text += (f" ({len(v.missing_at_boot_changes)} gap(s) at a boot change: "
                     "possibly skipped on purpose, see docs/protocol.md §6)")
        out.append(text)
    if v.duplicate_seqs:
        out.append(f"duplicates #{format_ranges((s, s) for s in v.duplicate_seqs)}")
    if v.seq_conflicts:
        out.append(f"SEQ CONFLICTS (same seq, different payload) #{format_ranges((s, s) for s in v.seq_conflicts)}")
    if v.rejected:
        out.append("rejected: " + ", ".join(f"{k} {n}" for k, n in sorted(v.rejected.items())))
    if v.incomplete_events:
        out.append(f"{v.incomplete_events} split event(s) still waiting for parts")
    if len(v.boots) > 1:
        out.append("boots: " + ", ".join(f"{b.boot_id[:8]} #{b.first_seq}-#{b.last_seq}"
                                         for b in v.boots))
    if v.reported_losses:
        out.append("agent reported losses: " + losses_text(v.reported_losses))
    return out


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- run


def identity_files(args: argparse.Namespace) -> tuple[str, str, str] | str:
    """(ca, cert, key), or what is missing."""
    base = Path(args.pki) if args.pki else None
    ca = args.ca or (str(base / "ca.crt") if base else None)
    cert = args.cert or (str(base / f"{args.name}.crt") if base else None)
    key = args.key or (str(base / f"{args.name}.key") if base else None)
    if ca is None or cert is None or key is None:
        return "give --ca, --cert and --key (or --pki DIR)"
    return ca, cert, key


def run(args: argparse.Namespace) -> int:
    files = identity_files(args)
    if isinstance(files, str):
        args._parser.print_usage(sys.stderr)
        error(files)
        return EX_USAGE
    ca, cert, key = files
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    records_out: IO[str] | None = None
    if args.output:
        try:
            records_out = open(args.output, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            error(f"cannot write {args.output}: {exc.strerror or exc}")
            return EX_CANTCREAT
    try:
        view = LiveView(sys.stdout, Style(color), quiet=args.quiet, records_out=records_out)
        try:
            monitor = BackendMonitor(
                host=args.host, port=args.port, ca_file=ca, cert_file=cert, key_file=key,
                topic_prefix=args.prefix, session_expiry_s=args.session_expiry,
                keep_records=0, log_rejections=args.quiet, on_batch=view.on_batch, on_status=view.on_status,
                on_rejected=view.on_rejected, on_connection=view.on_connection)
        except ConfigError as exc:
            error(f"cannot use the backend identity\n{exc}")
            return EX_CONFIG
        started = time.monotonic()
        stop = threading.Event()
        with stop_on_signals(stop.set) as received:
            monitor.start()
            try:
                end = None if args.duration is None else started + args.duration
                while not stop.is_set():
                    left = 0.5 if end is None else min(0.5, end - time.monotonic())
                    if left <= 0:
                        break
                    stop.wait(left)
            finally:
                monitor.stop()
        elapsed = time.monotonic() - started
    finally:
        if records_out is not None:
            records_out.close()
    snap = monitor.snapshot()
    if args.stats:
        data = snap.to_json()
        data["duration_s"] = round(elapsed, 3)
        data["stopped_by"] = "signal" if received else "duration"
        try:
            write_json_atomic(Path(args.stats), data)
        except OSError as exc:
            error(f"cannot write {args.stats}: {exc.strerror or exc}")
            return EX_CANTCREAT
    print("\n".join(summary_lines(snap, elapsed)), flush=True)
    connection = snap.connection
    if connection is not None and connection.connects == 0:
        last = connection.last_failure
        error("never connected to the broker" + (f": {last.cause}: {last.detail}" if last else ""))
        return EX_UNAVAILABLE
    return 0
