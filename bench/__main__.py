"""Run every benchmark and write docs/benchmarks.md: ``.venv/bin/python -m bench``.

Each benchmark measures the agent against a naive baseline in the same run and prints a
markdown section; this collects them. ``--only NAME`` reruns one and keeps the others'
sections from the existing file.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "benchmarks.md"

# name -> command printing (or writing to {md}) one markdown section starting with "## "
BENCHMARKS: dict[str, list[str]] = {
    "pipeline": [sys.executable, "-m", "bench.bench_pipeline", "--seconds", "30", "--rounds", "5",
                 "--markdown", "{md}"],
    "outbox": [sys.executable, "bench/bench_outbox.py", "--seconds", "20"],
    "uplink": [sys.executable, "-m", "bench.bench_uplink", "--markdown", "{md}"],
    "commands": [sys.executable, "-m", "bench.bench_commands", "--markdown", "{md}"],
}

HEADER = """# Benchmarks

Written by `.venv/bin/python -m bench` (all) or `.venv/bin/python -m bench --only NAME`.
Every figure is measured against a naive baseline in the same run, on the development machine
(2 shared cores, noisy): read the ratios and medians, not the absolute values. No test asserts
a timing; these numbers are the evidence for the speed and size goals of the issues.
"""


def run_one(name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        md = Path(tmp) / "section.md"
        command = [part.replace("{md}", str(md)) for part in BENCHMARKS[name]]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"benchmark {name} failed with exit status {proc.returncode}")
        text = md.read_text() if md.exists() else proc.stdout
    section = text[text.index("## "):].strip() if "## " in text else text.strip()
    print(f"bench: {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return f"<!-- bench:{name} -->\n{section}\n"


def existing_sections() -> dict[str, str]:
    if not OUTPUT.exists():
        return {}
    parts = re.split(r"(?m)^<!-- bench:(\w+) -->\n", OUTPUT.read_text())
    return {parts[i]: f"<!-- bench:{parts[i]} -->\n{parts[i + 1].strip()}\n"
            for i in range(1, len(parts) - 1, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args()
    sections = existing_sections()
    for name in args.only or list(BENCHMARKS):
        sections[name] = run_one(name)
    body = "\n".join(sections[name] for name in BENCHMARKS if name in sections)
    OUTPUT.write_text(f"{HEADER}\n{body}")
    print(f"bench: wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
