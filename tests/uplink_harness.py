"""The agent as a real process with its uplink: config files, recorded CAN traffic, control.

The agent reads a recorded drive of the diesel van through the ``sim-replay`` python-can
interface (paced in real time), so it runs as a separate process without SocketCAN, and
publishes to a real mosquitto (tests/broker.py) with mutual TLS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from agent.pki import PkiDir
from agent.profile.loader import load_profile
from bench.traffic import generate, write_candump
from tests.broker import VEHICLE_ID, MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent
VAN = ROOT / "firmware_profiles" / "diesel_van" / "diesel_van.yaml"


@cache
def van_log() -> Path:
    """Two minutes of the van's bus, recorded once per test session."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vt-van-{os.getpid()}.log"
    return write_candump(generate(load_profile(VAN), seconds=120), path)


def write_config(directory: Path, pki: PkiDir, port: int, *, vehicle_id: str = VEHICLE_ID,
                 outbox: dict[str, Any] | None = None, mqtt: dict[str, Any] | None = None,
                 profile: Path = VAN, buses: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """An agent config; by default the van replaying its recorded drive in real time."""
    directory.mkdir(parents=True, exist_ok=True)
    if buses is None:
        buses = {"powertrain": {"interface": "sim-replay", "channel": str(van_log()), "options": {"speed": 1.0}}}
    config = {
        "vehicle_id": vehicle_id,
        "profile": str(profile),
        "buses": buses,
        "clock": {"synced": "assume_synced"},
        "uplink": {
            "outbox": {"path": str(directory / "outbox.sqlite"), "flush_interval_ms": 250,
                       **(outbox or {})},
            "mqtt": {"host": "127.0.0.1", "port": port, "ca_file": str(pki.ca_cert),
                     "cert_file": str(pki.cert(vehicle_id)), "key_file": str(pki.key(vehicle_id)),
                     "keepalive_s": 5, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                     "denied_retry_min_s": 0.5, "denied_retry_max_s": 1.0, **(mqtt or {})},
        },
    }
    config.update(extra or {})
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class AgentProcess:
    """``telematics-agent run --config ...`` in a subprocess, stoppable and killable."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.stats_path = config.parent / "stats.json"
        self.log_path = config.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config),
                 "--stats", str(self.stats_path)],
                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        finally:
            log.close()
        return self

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.stats_path.read_text())
        return result

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def outbox_seqs(config: Path) -> list[int]:
    """Sequence numbers still stored in the agent's outbox (read with plain sqlite3)."""
    import sqlite3

    db = config.parent / "outbox.sqlite"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [r[0] for r in conn.execute("SELECT seq FROM batches ORDER BY seq")]
    except sqlite3.OperationalError:  # not created yet by the starting agent
        return []


__all__ = ["AgentProcess", "MosquittoBroker", "outbox_seqs", "van_log", "write_config"]
