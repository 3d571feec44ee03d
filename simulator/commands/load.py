"""``telematics-sim load``: fill buses to a share of their bitrate with the profile's frames."""

from __future__ import annotations

import argparse

from simulator.commands.common import (
    EX_USAGE,
    add_bus_argument,
    add_inject_arguments,
    add_output_arguments,
    add_profile_argument,
    error,
    fault_config,
    load_profile_or_none,
    positive_float,
    run_until,
)
from simulator.load import LoadRunner


def add_subparser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "load", help="load buses to a percentage of their bitrate",
        description="Send the profile's messages in turn, as fast as keeps each bus busy for "
                    "PERCENT of the time (frame lengths counted with stuff bits).")
    add_profile_argument(parser)
    add_bus_argument(parser, "bus to load and where it is (repeat per bus); default: every bus "
                             "of the profile at its profile channel")
    parser.add_argument("--percent", type=positive_float, required=True,
                        help="target bus load in percent of the bitrate (0-100]")
    parser.add_argument("--duration", type=positive_float, metavar="S",
                        help="stop after S seconds (default: until SIGINT/SIGTERM)")
    add_inject_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profile = load_profile_or_none(args.profile)
    if isinstance(profile, int):
        return profile
    overrides = dict(args.bus)
    try:
        runner = LoadRunner(profile, args.percent, buses=overrides, only=list(overrides) or None,
                            inject=fault_config(args))
    except ValueError as exc:
        error(str(exc))
        return EX_USAGE
    return run_until(runner, done=lambda: False, duration=args.duration, quiet=args.quiet,
                     interval=args.status_interval)
