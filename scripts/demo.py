"""The demo: the simulated EV drives on vcan0/vcan1, the agent reads it, records appear live.

Run through scripts/demo.sh, which provides the vcan interfaces.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "firmware_profiles" / "ev_sedan" / "ev_sedan.yaml"
BUSES = ["--bus", "powertrain=socketcan:vcan0", "--bus", "body=socketcan:vcan1"]


def describe(record: dict[str, object]) -> str:
    kind = record["type"]
    if kind == "sample":
        value = record["value"]
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        return f"sample     {record['signal']:<55} {shown:>10}   ({record['rule']})"
    if kind == "aggregate":
        values = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record["values"].items())  # type: ignore[attr-defined]
        return f"aggregate  {record['signal']:<55} {values}"
    samples = record["samples"]
    return f"EVENT      {record['rule']}: {record['condition']} ({len(samples)} samples captured)"  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args()
    python = sys.executable
    agent = subprocess.Popen([python, "-m", "agent", "run", "--profile", str(PROFILE), *BUSES,
                              "--output", "-", "--log-level", "warning"],
                             stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    sim = subprocess.Popen([python, "-m", "simulator", "drive", "--profile", str(PROFILE), *BUSES,
                            "--loop", "--quiet"])
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        sim.terminate()
        agent.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.duration:
        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, args.duration)
    print("simulated ev_sedan on vcan0 (powertrain, CAN FD) and vcan1 (body); agent records:", flush=True)
    assert agent.stdout is not None
    for line in agent.stdout:
        try:
            print(describe(json.loads(line)), flush=True)
        except (ValueError, KeyError):
            print(line, end="", flush=True)
    sim.wait()
    agent.wait()
    return 0 if stopping else 1


if __name__ == "__main__":
    raise SystemExit(main())
