#!/usr/bin/env bash
# Set up, then run every test: lint, types, the unit/integration suite, and the
# SocketCAN tier on real vcan interfaces (directly, or in a throw-away guest kernel
# when this kernel has no vcan; see scripts/vcan-tier).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check agent simulator tests bench scripts
echo "== mypy (strict on agent/)"
.venv/bin/mypy

run_pytest() {
    local rc=0
    "$@" || rc=$?
    if [ "$rc" = 5 ]; then echo "test.sh: pytest collected no tests: failing" >&2; return 1; fi
    return "$rc"
}
echo "== pytest"
run_pytest .venv/bin/python -m pytest -q -m "not vcan" tests
echo "== pytest, SocketCAN tier (vcan0, vcan1)"
VCAN_REQUIRED=1 run_pytest scripts/vcan-tier --ifaces "vcan0 vcan1" .venv/bin/python -m pytest -q -m vcan -p no:cacheprovider tests/vcan
