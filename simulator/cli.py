"""``telematics-sim``: drive the simulated vehicle, replay logs, load a bus.

Subcommands are modules listed in :data:`SUBCOMMANDS`. Each defines::

    def add_subparser(subparsers: argparse._SubParsersAction) -> None

which adds its parser and sets ``func`` (``(args: argparse.Namespace) -> int``, the exit
code) with ``parser.set_defaults(func=...)``. Adding a subcommand is one module plus one line
here. :mod:`simulator.commands.common` has the shared options (``--profile``, ``--bus``,
``--quiet``, fault injection), signal handling and the status line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import structlog

SUBCOMMANDS: list[str] = [
    "simulator.commands.drive",
    "simulator.commands.replay",
    "simulator.commands.load",
    "simulator.commands.backend",
]


def register(module: str) -> None:
    """Add a subcommand module (for plug-ins; the built-ins are listed above)."""
    if module not in SUBCOMMANDS:
        SUBCOMMANDS.append(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telematics-sim",
        description="Simulated vehicle for the telematics agent: drive cycle, log replay, "
                    "bus load and fault injection on python-can buses.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug); warnings by default")
    subparsers = parser.add_subparsers(title="subcommands", dest="subcommand", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_subparser(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
