"""``telematics-sim drive``: the drive cycle on every bus of a profile."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from simulator.actuators import SIMULATED_FAULTS
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
from simulator.runner import Simulator


def add_subparser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "drive", help="run the drive cycle on the profile's buses",
        description="Park, unlock, door, start, accelerate to 90 km/h, cruise, one hard brake, "
                    "stop, park, door, lock: every message of every bus at its DBC cycle time.")
    add_profile_argument(parser)
    add_bus_argument(parser, "override a profile bus's python-can interface and channel "
                             "(repeat per bus), e.g. powertrain=socketcan:vcan0")
    parser.add_argument("--time-scale", type=positive_float, default=1.0, metavar="X",
                        help="scenario seconds per real second (frames keep their real cycle "
                             "times); default 1")
    parser.add_argument("--loop", action="store_true",
                        help="repeat the cycle (odometer, charge and fuel carry on)")
    parser.add_argument("--duration", type=positive_float, metavar="S",
                        help="stop after S real seconds (default: one cycle, or forever with "
                             "--loop)")
    parser.add_argument("--info-file", metavar="PATH",
                        help="after start, write JSON with the start time (wall-clock ns), time "
                             "scale and phase times, for test harnesses in another process")
    parser.add_argument("--fault", action="append", default=[],
                        choices=[f.replace("_", "-") for f in SIMULATED_FAULTS],
                        help="simulate a broken ECU (repeatable): lock-actuator makes the body "
                             "control module ignore remote lock/unlock requests")
    add_inject_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def write_info(path: str, simulator: Simulator) -> None:
    """Atomically write what a harness needs to map frame timestamps to scenario time."""
    cycle = simulator.cycle
    info = {
        "profile": str(simulator.profile.path),
        "start_wall_ns": simulator.start_wall_ns,
        "time_scale": simulator.time_scale,
        "loop": simulator.loop,
        "duration_s": cycle.duration,
        "hard_brake_s": cycle.hard_brake_time,
        "phases": [{"name": p.name, "start_s": p.start, "end_s": p.end} for p in cycle.phases],
        "buses": {name: ":".join(simulator.bus_endpoint(name)) for name in simulator.bus_names},
    }
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, target)


def run(args: argparse.Namespace) -> int:
    profile = load_profile_or_none(args.profile)
    if isinstance(profile, int):
        return profile
    try:
        simulator = Simulator(profile, buses=dict(args.bus), time_scale=args.time_scale,
                              loop=args.loop, inject=fault_config(args), faults=args.fault)
    except ValueError as exc:
        error(str(exc))
        return EX_USAGE
    cycle = simulator.cycle
    if not args.quiet:
        print(f"drive cycle {cycle.duration:g} s scenario time "
              f"({cycle.duration / args.time_scale:.1f} s real), hard brake at "
              f"{cycle.hard_brake_time:.2f} s; phases: "
              + ", ".join(f"{p.name}@{p.start:g}" for p in cycle.phases),
              file=sys.stderr, flush=True)
    info_file = args.info_file
    return run_until(simulator, done=lambda: simulator.finished, duration=args.duration,
                     quiet=args.quiet, interval=args.status_interval,
                     on_start=(lambda _: write_info(info_file, simulator)) if info_file else None)
