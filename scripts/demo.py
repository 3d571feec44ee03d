"""The demo, live: simulated vehicle -> SocketCAN -> agent -> mosquitto (mutual TLS) -> backend.

1. a development PKI: fleet CA, broker certificate, backend identity, and a vehicle key made
   on the "vehicle" side with a CSR signed by the fleet CA (var/demo/pki);
2. a local mosquitto requiring client certificates, the client id bound to the certificate,
   and an ACL that lets the vehicle write only its own topics;
3. the simulated EV driving its cycle in a loop on vcan0 (powertrain, CAN FD) and vcan1 (body);
4. the agent reading both buses, applying the profile's rules, buffering in its SQLite
   outbox and publishing CBOR batches over MQTT v5;
5. the backend decoding the batches and showing them as they arrive, with sequence checks;
6. an operator sending signed remote commands (unlock while parked, lock while driving, a
   refused unlock while driving) that the simulated body ECU carries out.

Run through scripts/demo.sh, which provides the vcan interfaces.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import yaml

from agent.cli.pki import provision_command_key
from agent.pki import PkiDir, dev_setup, issue_identity
from agent.uplink.broker_config import AclPolicy, BrokerConfig, write_broker_config

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "firmware_profiles" / "ev_sedan" / "ev_sedan.yaml"
BUSES = ["--bus", "powertrain=socketcan:vcan0", "--bus", "body=socketcan:vcan1"]
VEHICLE_ID = "DEMOEV00000000001"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
OPERATOR = "operator"
# (seconds after the vehicle starts, command): parked at first, driving from about 10 s
COMMANDS = [(4.0, "unlock_doors"), (16.0, "lock_doors"), (20.0, "unlock_doors")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"demo: mosquitto did not start listening on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args()
    work = ROOT / "var" / "demo"
    work.mkdir(parents=True, exist_ok=True)
    pki = PkiDir(work / "pki")
    if not pki.cert(VEHICLE_ID).exists():
        dev_setup(pki, [VEHICLE_ID])
    if not pki.cert(OPERATOR).exists():  # one MQTT identity per client: monitor and operator
        issue_identity(pki, OPERATOR)
    signing_key, trusted_keys = pki.root / "command-signing.key", pki.root / "trusted-command-keys.yaml"
    provision_command_key(signing_key, kid="dev-1", issuer="fleet-ops", trusted_keys=trusted_keys)
    port = free_port()
    broker_dir = Path(tempfile.mkdtemp(prefix="vt-demo-broker-"))  # readable by the mosquitto user
    acl = AclPolicy(backend_users=("backend", OPERATOR))
    files = write_broker_config(broker_dir, BrokerConfig(port=port, acl=acl), ca_cert=pki.ca_cert,
                                broker_cert=pki.cert("broker"), broker_key=pki.key("broker"))
    config = work / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "vehicle_id": VEHICLE_ID,
        "profile": str(PROFILE),
        "buses": {"powertrain": {"interface": "socketcan", "channel": "vcan0"},
                  "body": {"interface": "socketcan", "channel": "vcan1"}},
        "uplink": {
            "outbox": {"path": str(work / "outbox.sqlite")},
            "mqtt": {"host": "127.0.0.1", "port": port, "ca_file": str(pki.ca_cert),
                     "cert_file": str(pki.cert(VEHICLE_ID)), "key_file": str(pki.key(VEHICLE_ID))},
        },
        "commands": {"trusted_keys": str(trusted_keys), "replay": {"path": str(work / "replay.sqlite")}},
        "log": {"level": "warning"},
    }, sort_keys=False))

    python = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    broker_log = (work / "mosquitto.log").open("wb")
    procs.append(subprocess.Popen([MOSQUITTO, "-c", str(files.conf)], stdout=broker_log, stderr=broker_log))
    wait_for_port(port)
    backend = subprocess.Popen([python, "-m", "simulator", "backend", "--host", "127.0.0.1", "--port", str(port),
                                "--pki", str(pki.root), "--color", "always"])
    procs.append(backend)
    agent_log = (work / "agent.log").open("wb")
    procs.append(subprocess.Popen([python, "-m", "agent", "run", "--config", str(config)],
                                  stdout=agent_log, stderr=agent_log))
    time.sleep(1.5)
    procs.append(subprocess.Popen([python, "-m", "simulator", "drive", "--profile", str(PROFILE), *BUSES,
                                   "--loop", "--quiet"]))
    print(f"demo: vehicle {VEHICLE_ID} on vcan0+vcan1 -> agent -> mosquitto 127.0.0.1:{port} (mutual TLS) "
          f"-> backend; logs in {work}", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        for proc in reversed(procs):  # vehicle first, broker last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.duration:
        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, args.duration)
    started = time.monotonic()
    pending = list(COMMANDS)
    commands: list[subprocess.Popen[bytes]] = []
    operator = [python, "-m", "simulator", "backend", "--host", "127.0.0.1", "--port", str(port), "--pki",
                str(pki.root), "--name", OPERATOR, "command", "--vehicle", VEHICLE_ID,
                "--signing-key", str(signing_key), "--kid", "dev-1", "--timeout", "10"]
    while backend.poll() is None:
        if pending and time.monotonic() - started >= pending[0][0]:
            _, name = pending.pop(0)
            print(f"demo: operator sends {name}", flush=True)
            commands.append(subprocess.Popen([*operator, "--name", name]))
        if any(p.poll() is not None for p in procs if p is not backend):
            print("demo: a component stopped unexpectedly; see the logs in var/demo", file=sys.stderr)
            stop(signal.SIGTERM, None)
            return 1
        time.sleep(0.5)
    stop(signal.SIGTERM, None)
    for proc in commands:
        if proc.poll() is None:
            proc.terminate()
    shutil.rmtree(broker_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
