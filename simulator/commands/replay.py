"""``telematics-sim replay``: send a recorded log (candump .log, .asc, .blf, .trc, ...)."""

from __future__ import annotations

import argparse

from simulator.commands.common import (
    EX_DATAERR,
    EX_NOINPUT,
    EX_USAGE,
    add_bus_argument,
    add_inject_arguments,
    add_output_arguments,
    add_profile_argument,
    error,
    fault_config,
    load_profile_or_none,
    mapping,
    positive_float,
    run_until,
)
from simulator.replay import ReplayRunner


def add_subparser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "replay", help="replay a recorded CAN log onto buses",
        description="Replay any log python-can reads, at recorded speed or faster. Frames go "
                    "to the bus given by --map for their log channel, else to the only "
                    "target bus, else to the bus whose name or profile channel equals it.")
    parser.add_argument("file", metavar="FILE", help="log file (.log candump, .asc, .blf, .trc)")
    add_profile_argument(parser)
    add_bus_argument(parser, "target bus and where it is (repeat per bus); default: every "
                             "bus of the profile at its profile channel")
    parser.add_argument("--speed", type=positive_float, default=1.0, metavar="X",
                        help="replay X times faster than recorded (default 1)")
    parser.add_argument("--map", action="append", type=mapping, default=[],
                        metavar="LOGCHANNEL=BUS", help="send frames of a log channel to a bus")
    add_inject_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profile = load_profile_or_none(args.profile)
    if isinstance(profile, int):
        return profile
    overrides = dict(args.bus)
    try:
        runner = ReplayRunner(profile, args.file, buses=overrides, only=list(overrides) or None,
                              speed=args.speed, channel_map=dict(args.map),
                              inject=fault_config(args))
    except FileNotFoundError as exc:
        error(str(exc))
        return EX_NOINPUT
    except ValueError as exc:
        error(str(exc))
        return EX_USAGE
    code = run_until(runner, done=lambda: runner.replay.done, duration=None, quiet=args.quiet,
                     interval=args.status_interval)
    if code == 0 and runner.replay.error:
        error(runner.replay.error)
        return EX_DATAERR
    return code
