"""``telematics-agent run``: read CAN, apply the profile's rules, emit records."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

from agent.commands.service import CommandService, RequestQueue
from agent.config import AgentConfig, BusOverride, JsonLinesOutput, load_agent_config
from agent.errors import ConfigError
from agent.logs import configure_logging
from agent.pipeline import Pipeline, PipelineSettings
from agent.profile.loader import load_profile
from agent.records import Sink
from agent.sinks import TeeSink, sink_class
from agent.uplink.service import Uplink

HELP = "run the agent"


def parse_bus_override(text: str) -> tuple[str, BusOverride]:
    name, sep, rest = text.partition("=")
    interface, sep2, channel = rest.partition(":")
    if not sep or not sep2 or not name or not interface or not channel:
        raise argparse.ArgumentTypeError(f"expected NAME=INTERFACE:CHANNEL, got {text!r}")
    return name, BusOverride(interface=interface, channel=channel)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="agent configuration file (YAML)")
    source.add_argument("--profile", help="vehicle profile, for a quick run without a config")
    parser.add_argument("--vehicle-id", default="dev-vehicle", help="with --profile")
    parser.add_argument("--bus", action="append", type=parse_bus_override, default=[],
                        metavar="NAME=INTERFACE:CHANNEL",
                        help="open profile bus NAME on this interface/channel (repeatable)")
    parser.add_argument("--output", help="JSON-lines output file, - for stdout")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--stats", help="write final pipeline counters as JSON to this file")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _config(args: argparse.Namespace) -> tuple[AgentConfig, str]:
    if args.config:
        config, profile_path = load_agent_config(args.config)
        return config, str(profile_path)
    config = AgentConfig(vehicle_id=args.vehicle_id, profile=args.profile)
    return config, args.profile


def run(args: argparse.Namespace) -> int:
    # A stop requested while starting up (loading, connecting) takes effect once running.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    config, profile_path = _config(args)
    overrides = dict(config.buses)
    overrides.update(dict(args.bus))
    configure_logging(args.log_level or config.log.level, config.log.format)
    profile = load_profile(profile_path)
    unknown = sorted(set(overrides) - {b.name for b in profile.spec.buses})
    if unknown:
        raise ConfigError.single(profile_path, f"bus override for unknown bus(es) {unknown}; "
                                 f"the profile has {[b.name for b in profile.spec.buses]}")
    if config.firmware_version and not profile.matches_firmware(config.firmware_version):
        raise ConfigError.single(
            profile_path, f"firmware {config.firmware_version} is not covered by this profile "
            f"({', '.join(profile.spec.vehicle.firmware_versions)})", path="vehicle.firmware_versions")

    requests = RequestQueue() if config.commands else None
    uplink = Uplink(config.uplink, config.vehicle_id, inbox=requests) if config.uplink else None
    sinks: list[Sink] = [uplink.sink] if uplink else []
    output = JsonLinesOutput(type="jsonl", path=args.output) if args.output else config.output
    if output is not None or not sinks:
        output = output or JsonLinesOutput(type="jsonl")
        sinks.append(sink_class(output.type)(output.path))
    pipeline = Pipeline(profile, sinks[0] if len(sinks) == 1 else TeeSink(sinks), overrides,
                        PipelineSettings(config.can, config.clock))

    commands = None
    if config.commands and uplink and requests:
        commands = CommandService(config.commands, profile, pipeline, config.vehicle_id,
                                  uplink.publish_result, requests, status=pipeline.stats)

    def stop(signum: int, frame: FrameType | None) -> None:
        pipeline.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if stopping.is_set():
        pipeline.stop()
    if uplink:
        uplink.start()
    if commands:
        commands.start()
    try:
        pipeline.run(args.duration)
    finally:
        if commands:
            commands.close()
        if uplink:
            uplink.close()
    stats = pipeline.stats()
    if uplink:
        stats["uplink"] = uplink.stats()
    if commands:
        stats["commands"] = dict(commands.counters)
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2, default=str)
    print(json.dumps(stats, default=str), file=sys.stderr)
    return 0
