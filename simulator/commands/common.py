"""Options, error reporting, signal handling and the status line shared by the subcommands."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from agent.errors import EX_CONFIG, BusUnavailable, ConfigError
from agent.profile.loader import LoadedProfile, load_profile
from simulator.inject import FAULT_KINDS, FaultConfig, parse_kinds
from simulator.runner import BusRunner

EX_USAGE = 2  # what argparse uses for bad options
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def bus_override(text: str) -> tuple[str, tuple[str, str]]:
    """``NAME=INTERFACE:CHANNEL`` -> (name, (interface, channel)); the channel may hold ':'."""
    name, sep, endpoint = text.partition("=")
    interface, sep2, channel = endpoint.partition(":")
    if not (sep and sep2 and name and interface and channel):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=INTERFACE:CHANNEL, e.g. powertrain=socketcan:vcan0")
    return name.strip(), (interface.strip(), channel.strip())


def mapping(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not (sep and key and value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOGCHANNEL=BUS, e.g. can0=powertrain")
    return key.strip(), value.strip()


def fault_kinds(text: str) -> tuple[str, ...]:
    try:
        return parse_kinds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, metavar="PROFILE",
                        help="vehicle profile YAML (its buses and databases)")


def add_bus_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--bus", action="append", type=bus_override, default=[],
                        metavar="NAME=INTERFACE:CHANNEL", help=help_text)


def add_inject_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fault injection")
    group.add_argument("--inject", type=fault_kinds, metavar="KINDS",
                       help=f"comma-separated fault kinds: {', '.join(FAULT_KINDS)}, or all")
    group.add_argument("--inject-rate", type=positive_float, default=2.0, metavar="HZ",
                       help="faults per second, all kinds and buses together (default 2)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no periodic status line on stderr")
    parser.add_argument("--status-interval", type=positive_float, default=2.0, metavar="S",
                        help="seconds between status lines (default 2)")


def fault_config(args: argparse.Namespace) -> FaultConfig | None:
    if not args.inject:
        return None
    return FaultConfig(kinds=args.inject, rate_hz=args.inject_rate)


def error(message: str) -> None:
    print(f"telematics-sim: error: {message}", file=sys.stderr)


def load_profile_or_none(path: str) -> LoadedProfile | int:
    """The loaded profile, or the exit code after reporting why it cannot be used."""
    try:
        return load_profile(path)
    except ConfigError as exc:
        error(f"invalid profile\n{exc}")
        return EX_CONFIG
    except FileNotFoundError as exc:
        error(str(exc))
        return EX_NOINPUT


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[list[int]]:
    """SIGINT/SIGTERM call ``stop`` (once each); yields the list of signals received."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_until(runner: BusRunner, *, done: Callable[[], bool], duration: float | None,
              quiet: bool, interval: float,
              on_start: Callable[[BusRunner], None] | None = None) -> int:
    """Start ``runner``; stop on ``done()``, after ``duration`` s, or on SIGINT/SIGTERM."""
    with stop_on_signals(runner.request_stop) as received:
        try:
            runner.start()
        except BusUnavailable as exc:
            error(str(exc))
            return EX_UNAVAILABLE
        try:
            if on_start is not None:
                try:
                    on_start(runner)
                except OSError as exc:
                    error(str(exc))
                    return EX_CANTCREAT
            started = time.monotonic()
            end = None if duration is None else started + duration
            while not received and not runner.failed:
                timeout = interval if end is None else min(interval, end - time.monotonic())
                finished = runner.wait_for(done, max(0.0, timeout))
                if finished or received or (end is not None and time.monotonic() >= end):
                    break
                if not quiet:
                    print(runner.status_line(), file=sys.stderr, flush=True)
        finally:
            try:
                runner.stop()
            except RuntimeError as exc:
                error(f"{exc}: {exc.__cause__!r}")
                return EX_SOFTWARE
    if not quiet:
        reason = "stopped by signal" if received else "done"
        print(f"{runner.status_line()} | {reason}", file=sys.stderr, flush=True)
    return 0


__all__ = ["EX_CANTCREAT", "EX_DATAERR", "EX_NOINPUT", "EX_SOFTWARE", "EX_UNAVAILABLE", "EX_USAGE", "add_bus_argument",
           "add_inject_arguments", "add_output_arguments", "add_profile_argument",
           "bus_override", "error", "fault_config", "load_profile_or_none", "mapping",
           "positive_float", "run_until", "stop_on_signals"]
