#!/usr/bin/env bash
# Set up, then run the demo live. Options are passed to scripts/demo.py (--duration S).
# CAN needs real vcan interfaces: scripts/vcan-tier creates them directly where the kernel
# has the vcan module, or runs the demo inside a throw-away user-mode-linux guest otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec scripts/vcan-tier --ifaces "vcan0 vcan1" .venv/bin/python scripts/demo.py "$@"
