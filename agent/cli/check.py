"""``telematics-agent check``: validate a profile and its databases before deploying."""

from __future__ import annotations

import argparse

from agent.profile.loader import load_profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profiles", nargs="+", metavar="PROFILE", help="vehicle profile YAML")


def run(args: argparse.Namespace) -> int:
    for path in args.profiles:
        print(load_profile(path).summary())
    return 0
