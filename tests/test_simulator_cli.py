"""``telematics-sim``: subcommands run in-process on virtual buses, exit codes, signals."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
import structlog

from agent.errors import EX_CONFIG
from simulator import cli
from simulator.commands.common import bus_override

ROOT = Path(__file__).resolve().parent.parent
SIM_PROFILE = str(ROOT / "tests" / "data" / "sim" / "sim_ev.yaml")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # cli.main configures logging for the whole process


def channels() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"cli-{tag}-pt", f"cli-{tag}-body"


def drain(bus: can.BusABC) -> list[can.Message]:
    out = []
    while (message := bus.recv(timeout=0)) is not None:
        out.append(message)
    return out


def test_bus_option_parsing() -> None:
    assert bus_override("powertrain=socketcan:vcan0") == ("powertrain", ("socketcan", "vcan0"))
    assert bus_override("body=slcan:/dev/ttyACM0@115200") == ("body", ("slcan",
                                                                       "/dev/ttyACM0@115200"))
    assert bus_override("pt=pcan:PCAN_USBBUS1:x") == ("pt", ("pcan", "PCAN_USBBUS1:x"))
    for bad in ("powertrain", "powertrain=socketcan", "=virtual:x", "pt=:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bus_override(bad)


def test_drive_one_cycle_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pt, body = channels()
    receivers = [can.Bus(interface="virtual", channel=c) for c in (pt, body)]
    info_file = tmp_path / "sim.json"
    try:
        code = cli.main(["drive", "--profile", SIM_PROFILE, "--bus", f"powertrain=virtual:{pt}",
                         "--bus", f"body=virtual:{body}", "--time-scale", "100",
                         "--inject", "error-frames", "--inject-rate", "20",
                         "--status-interval", "0.2", "--info-file", str(info_file)])
        frames = [drain(r) for r in receivers]
    finally:
        for r in receivers:
            r.shutdown()
    assert code == 0
    assert len(frames[0]) > 50 and len(frames[1]) > 10
    assert any(f.is_error_frame for f in frames[0] + frames[1])
    err = capsys.readouterr().err
    assert "hard brake at" in err and "powertrain:" in err and "| done" in err
    info = json.loads(info_file.read_text())
    assert info["time_scale"] == 100.0 and info["buses"]["powertrain"] == f"virtual:{pt}"
    assert info["phases"][7]["name"] == "hard_brake"
    assert info["phases"][7]["start_s"] < info["hard_brake_s"] < info["phases"][7]["end_s"]
    # Every frame was sent after the recorded start.
    assert min(f.timestamp for f in frames[0]) >= info["start_wall_ns"] / 1e9 - 0.001


def test_load_and_replay_in_process(tmp_path: Path) -> None:
    pt, _ = channels()
    receiver = can.Bus(interface="virtual", channel=pt)
    log = tmp_path / "trace.log"
    with can.Logger(log) as writer:
        for i in range(10):
            writer.on_message_received(can.Message(timestamp=i * 0.01, channel="can0",
                                                   arbitration_id=0x300 + i,
                                                   is_extended_id=False, data=bytes([i])))
    try:
        assert cli.main(["load", "--profile", SIM_PROFILE, "--bus", f"powertrain=virtual:{pt}",
                         "--percent", "10", "--duration", "0.3", "-q"]) == 0
        loaded = drain(receiver)
        assert cli.main(["replay", str(log), "--profile", SIM_PROFILE,
                         "--bus", f"powertrain=virtual:{pt}", "--speed", "5", "-q"]) == 0
        replayed = drain(receiver)
    finally:
        receiver.shutdown()
    assert len(loaded) > 10
    assert [f.arbitration_id for f in replayed] == [0x300 + i for i in range(10)]


@pytest.mark.parametrize(("args", "code"), [
    (["drive", "--profile", SIM_PROFILE, "--bus", "chassis=virtual:x"], 2),
    (["drive", "--profile", str(ROOT / "tests" / "data" / "sim" / "missing.yaml")], EX_CONFIG),
    (["drive", "--profile", SIM_PROFILE, "--bus", "powertrain=socketcan:nosuchcan0",
      "--bus", "body=virtual:x", "-q"], 69),
    (["replay", "/nonexistent/trace.log", "--profile", SIM_PROFILE], 66),
    (["load", "--profile", SIM_PROFILE, "--percent", "150", "--bus", "body=virtual:x"], 2),
])
def test_errors_exit_with_a_reason(args: list[str], code: int,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args) == code
    assert "telematics-sim: error:" in capsys.readouterr().err


def test_bad_options_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["drive", "--profile", SIM_PROFILE, "--bus", "nonsense"],
                 ["drive", "--profile", SIM_PROFILE, "--inject", "gremlins"],
                 ["drive", "--profile", SIM_PROFILE, "--time-scale", "-1"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 2
    assert "gremlins" in capsys.readouterr().err


def add_subparser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """A plug-in subcommand, registered by the test below."""
    parser = subparsers.add_parser("hello", help="test subcommand")
    parser.add_argument("--code", type=int, default=7)
    parser.set_defaults(func=lambda args: args.code)


def test_a_subcommand_is_one_registration_away() -> None:
    assert cli.SUBCOMMANDS[:3] == ["simulator.commands.drive", "simulator.commands.replay",
                                   "simulator.commands.load"]
    cli.register(__name__)
    try:
        assert cli.main(["hello", "--code", "5"]) == 5
    finally:
        cli.SUBCOMMANDS.remove(__name__)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_process_cleanly(signum: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "drive", "--profile", SIM_PROFILE, "--loop",
         "--bus", "powertrain=virtual:a", "--bus", "body=virtual:b", "--status-interval", "0.1"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert process.stderr is not None
        for line in process.stderr:  # wait until it is sending
            if "frames" in line:
                break
        process.send_signal(signum)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "stopped by signal" in err
