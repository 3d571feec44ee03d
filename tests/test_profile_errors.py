"""Every class of profile error names file, line and key path; `run` exits 78."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.schema import profile_json_schema
from agent.errors import EX_CONFIG, ConfigError
from agent.profile.loader import load_profile

UNIT_DIR = Path(__file__).parent / "data" / "unit"
BASE = (UNIT_DIR / "unit.yaml").read_text()


def write(tmp_path: Path, text: str, name: str = "ev.yaml") -> Path:
    shutil.copy(UNIT_DIR / "unit.dbc", tmp_path / "unit.dbc")
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_profile(write(tmp_path, text))
    return [str(p) for p in info.value.problems]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


CASES = [
    # (description, replace old, by new, expected key path, expected message part, line needle)
    ("value out of range", "period_ms: 100", "period_ms: 0", "rules[0].period_ms", "must be > 0", "period_ms: 0"),
    ("unknown key", "deadband: 0.5", "deadband: 0.5, colour: red", "rules[1].colour", "unknown key", "colour: red"),
    ("missing key", "  family: unit_test\n", "", "vehicle.family", "required key is missing", "vehicle:"),
    ("bad rule type", "type: periodic, name: speed_10hz", "type: sometimes, name: speed_10hz",
     "rules[0]", "type must be one of", "sometimes"),
    ("wrong type", "period_ms: 100", "period_ms: fast", "rules[0].period_ms", "integer", "fast"),
    ("bad literal", "min_interval_ms: 10000", "min_interval_ms: 10000\n    mode: sometimes", "rules[2].mode",
     "must be one of", "mode: sometimes"),
    ("unknown message", "message: Dynamics, signal: Speed", "message: Dynamix, signal: Speed",
     "signals[0].message", "message 'Dynamix' not found", "Dynamix"),
    ("unknown dbc signal", "signal: Brake,", "signal: Brak,", "signals[1].signal",
     "signal 'Brak' not in message", "Brak"),
    ("unit disagrees", "signal: Speed, unit: km/h", "signal: Speed, unit: mph", "signals[0].unit",
     "disagrees with the database's 'km/h'", "mph"),
    ("rule uses unknown signal", "signals: [Vehicle.Speed]}", "signals: [Vehicle.Sped]}", "rules[0].signals[0]",
     "unknown signal 'Vehicle.Sped'", "Vehicle.Sped"),
    ("expression does not parse", '"Vehicle.Chassis.Brake.PedalPosition > 80 and Vehicle.Speed > 50"',
     '"Vehicle.Chassis.Brake.PedalPosition > > 80"', "rules[2].condition", "invalid expression", "> > 80"),
    ("expression unsafe", '"Vehicle.Chassis.Brake.PedalPosition > 80 and Vehicle.Speed > 50"',
     '"__import__(\'os\').system(\'true\')"', "rules[2].condition", "invalid expression", "__import__"),
    ("expression unknown signal", "Vehicle.Speed > 50\"", "Vehicle.Speedo > 50\"", "rules[2].condition",
     "unknown signal 'Vehicle.Speedo' in expression", "Vehicle.Speedo > 50"),
    ("expression units differ", "Vehicle.Speed > 50\"", "Vehicle.Speed > Vehicle.Chassis.Brake.PedalPosition\"",
     "rules[2].condition", "units differ", "Speed > Vehicle.Chassis"),
    ("duplicate rule name", "name: door_counts", "name: speed_stats", "rules[4].name", "duplicate rule",
     "signals: [Vehicle.Door]"),
    ("duplicate yaml key", "  family: unit_test\n", "  family: unit_test\n  family: other\n", "vehicle.family",
     "duplicate key", "family: other"),
    ("missing database", "databases: [unit.dbc]", "databases: [missing.dbc]", "buses[0].databases[0]",
     "database file not found", "missing.dbc"),
    ("bad name", "{name: Vehicle.Voltage,", "{name: 'Vehicle..Voltage',", "signals[5].name",
     "is not a valid name", "Vehicle..Voltage"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_problem_is_located(tmp_path: Path, case: tuple[str, ...]) -> None:
    _, old, new, key_path, message, needle = case
    assert old in BASE, old
    text = BASE.replace(old, new, 1)
    found = problems(tmp_path, text)
    expected_prefix = f"{tmp_path / 'ev.yaml'}:{line_of(text, needle)} {key_path}:"
    assert any(p.startswith(expected_prefix) and message in p for p in found), (expected_prefix, found)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = BASE.replace("rules:\n", "rules:\n  - [unclosed\n", 1)
    found = problems(tmp_path, text)
    assert len(found) == 1 and "YAML syntax error" in found[0]
    assert found[0].startswith(f"{tmp_path / 'ev.yaml'}:")


def test_broken_database_is_reported_on_its_profile_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "unit.dbc").write_text("BO_ 256 Dynamics: 8 ECU\n SG_ Speed : nonsense\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert any(f"ev.yaml:{line_of(BASE, 'databases:')} buses[0].databases[0]: cannot load unit.dbc" in str(p)
               for p in info.value.problems)


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = BASE.replace("period_ms: 100,", "period_ms: -1,").replace("window_ms: 1000", "window_ms: 0", 1)
    assert len(problems(tmp_path, text)) == 2


def test_run_exits_78_with_located_message(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("period_ms: 100", "period_ms: 0"))
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--profile", str(path), "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EX_CONFIG
    assert f"{path}:{line_of(path.read_text(), 'period_ms: 0')} rules[0].period_ms: must be > 0" in proc.stderr


def test_run_exits_78_on_bad_agent_config(tmp_path: Path) -> None:
    write(tmp_path, BASE, "unit.yaml")
    config = tmp_path / "agent.yaml"
    config.write_text("vehicle_id: VIN1\nprofile: unit.yaml\ncan:\n  receive_buffer_bytes: 12\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EX_CONFIG
    assert f"{config}:4 can.receive_buffer_bytes: must be >= 65536" in proc.stderr


def test_check_prints_summary(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "check", str(UNIT_DIR / "unit.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "4 messages needed by rules and commands" in proc.stdout
    assert "rules: 6 (2 aggregate, 1 on_change, 2 periodic, 1 trigger)" in proc.stdout


def test_shipped_json_schema_is_current() -> None:
    shipped = json.loads((Path(__file__).parent.parent / "docs" / "profile.schema.json").read_text())
    assert shipped == profile_json_schema()
