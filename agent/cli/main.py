"""``telematics-agent`` entry point.

Subcommands are looked up lazily by name so that ``check`` does not import the MQTT
stack and ``run`` starts quickly. Each module provides ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from agent import __version__
from agent.errors import EX_CONFIG, ConfigError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("agent.cli.run", "run the agent: read CAN, apply rules, emit records"),
    "check": ("agent.cli.check", "validate a vehicle profile together with its CAN databases"),
    "schema": ("agent.cli.schema", "print the JSON Schema of vehicle profiles (for editors)"),
    "pki": ("agent.cli.pki", "development PKI: fleet CA, broker and vehicle certificates"),
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(SUBCOMMANDS[name][0])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telematics-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            _load(name).add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if a in SUBCOMMANDS), None)
    args = build_parser(chosen).parse_args(args_list)
    try:
        result: int = _load(args.command).run(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    return result
