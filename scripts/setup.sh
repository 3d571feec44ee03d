#!/usr/bin/env bash
# Idempotent set-up on Debian 12 / Raspberry Pi OS (bookworm) or newer:
# system packages (mosquitto for the uplink, can-utils/iproute2 for SocketCAN) and a
# project virtualenv in .venv with the agent installed editable plus test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "setup: Python >= 3.11 is required (found $(python3 --version 2>&1))" >&2; exit 1; }

packages=(python3-venv python3-pip mosquitto mosquitto-clients can-utils iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
        echo "setup: please install: apt-get install -y ${missing[*]}" >&2; exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' >&2
    rm -f .venv/.installed-*
    touch "$stamp"
fi
