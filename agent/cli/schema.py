"""``telematics-agent schema``: JSON Schema of vehicle profiles, for editors."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.profile.model import VehicleProfile


def profile_json_schema() -> dict[str, Any]:
    schema = VehicleProfile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Telematics agent vehicle profile"
    return schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", help="write to this file instead of stdout")


def run(args: argparse.Namespace) -> int:
    text = json.dumps(profile_json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text, end="")
    return 0
