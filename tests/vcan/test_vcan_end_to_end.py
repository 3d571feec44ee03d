"""Simulator and agent as separate processes over real SocketCAN (vcan0 + vcan1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.profile.loader import load_profile
from simulator.scenario import DriveCycle

ROOT = Path(__file__).parent.parent.parent
EV = ROOT / "firmware_profiles" / "ev_sedan" / "ev_sedan.yaml"
TIME_SCALE = 4.0

pytestmark = pytest.mark.vcan


def test_drive_cycle_over_two_vcan_buses(vcan_channels: tuple[str, str], tmp_path: Path) -> None:
    pt, body = vcan_channels
    out, stats_file, info_file = tmp_path / "samples.jsonl", tmp_path / "stats.json", tmp_path / "sim.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--profile", str(EV), "--bus", f"powertrain=socketcan:{pt}",
         "--bus", f"body=socketcan:{body}", "--output", str(out), "--stats", str(stats_file)],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        # wait until both buses are open (the agent logs it) before the vehicle starts
        opened = 0
        deadline = time.monotonic() + 60
        assert agent.stderr is not None
        while opened < 2 and time.monotonic() < deadline:
            line = agent.stderr.readline()
            assert line, "agent exited early"
            opened += "bus open" in line
        sim = subprocess.run(
            [sys.executable, "-m", "simulator", "drive", "--profile", str(EV), "--bus", f"powertrain=socketcan:{pt}",
             "--bus", f"body=socketcan:{body}", "--time-scale", str(TIME_SCALE), "--info-file", str(info_file),
             "--inject", "error-frames,unknown-ids", "--inject-rate", "2", "--quiet"],
            env=env, capture_output=True, text=True, timeout=300)
        assert sim.returncode == 0, sim.stderr[-2000:]
        time.sleep(2.5)  # the post-trigger window of the hard-brake capture
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err[-3000:]

    stats = json.loads(stats_file.read_text())
    info = json.loads(info_file.read_text())
    buses = stats["buses"]
    # kernel filters: frames of messages no rule needs and injected unknown ids never reach the agent
    assert buses["powertrain"]["not_needed"] == 0 and buses["powertrain"]["unknown_id"] == 0
    assert buses["body"]["not_needed"] == 0 and buses["body"]["unknown_id"] == 0
    # error frames pass the kernel's error filter and are counted, never fatal
    assert buses["powertrain"]["error_frames"] + buses["body"]["error_frames"] >= 1
    assert buses["powertrain"]["receive_buffer_bytes"] >= 4 * 1024 * 1024
    assert buses["powertrain"]["decoded"] > 100 and buses["body"]["decoded"] > 5

    records = [json.loads(line) for line in out.read_text().splitlines()]
    profile = load_profile(EV)
    cycle = DriveCycle.for_signals(profile.catalog)
    assert cycle.duration == pytest.approx(info["duration_s"])

    def scenario_time(ts_ns: int) -> float:
        return (ts_ns - info["start_wall_ns"]) / 1e9 * info["time_scale"]

    speeds = [r for r in records if r["type"] == "sample" and r["rule"] == "speed_10hz"]
    assert len(speeds) >= cycle.duration / TIME_SCALE * 10 * 0.7
    close = 0
    for r in speeds:
        t = scenario_time(r["ts_ns"])
        window = [cycle.state_at(max(0.0, t - dt))["Vehicle.Speed"] for dt in (0, 0.1, 0.2, 0.3, 0.4)]
        close += min(window) - 1 <= r["value"] <= max(window) + 1
    assert close >= 0.95 * len(speeds)

    events = [r for r in records if r["type"] == "event" and r["rule"] == "hard_brake"]
    assert len(events) == 1
    assert abs(scenario_time(events[0]["trigger_ts_ns"]) - info["hard_brake_s"]) < 1.5
    brake = [s["value"] for s in events[0]["samples"] if s["signal"] == "Vehicle.Chassis.Brake.PedalPosition"]
    assert min(brake) < 20 and max(brake) > 80
    # the body bus (vcan1) delivered the lock state changes
    locks = [r["value"] for r in records if r["type"] == "sample"
             and r["signal"] == "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"]
    assert "UNLOCKED" in locks and locks[-1] == "LOCKED"
