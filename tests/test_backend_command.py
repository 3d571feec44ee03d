"""``telematics-sim backend ... command`` and ``telematics-agent pki command-key`` against a real mosquitto.

A fake vehicle (a paho client with the vehicle's certificate, subscribed to its
``vt/VIN/cmd/req/+``) verifies every request with the real ``CommandVerifier`` and a keyring
loaded from the trusted keys file ``pki command-key`` wrote, then answers with real result
payloads (``ResultBatch(...).seal(seq)``) on ``vt/VIN/cmd/res``.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import paho.mqtt.client as paho
import pytest
import structlog
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent import pki
from agent.cli.main import main as agent_main
from agent.commands.envelope import CommandRejected, CommandVerifier, StaticReplayView, VerifiedCommand
from agent.commands.keys import Keyring, load_keyring, load_signing_key, raw_public_key
from agent.commands.results import CommandResult, ResultBatch
from agent.errors import EX_CONFIG
from agent.profile.model import ParameterSpec
from simulator import cli
from simulator.backend import BackendMonitor
from simulator.commands.backend_command import ResultFollower, parameter, result_line
from tests.broker import VEHICLE_ID, MosquittoBroker, free_port, make_dev_pki

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # generous upper bound for slow machines; never a pass/fail timing threshold
VIN = VEHICLE_ID
KID = "fleet-test-1"
ISSUER = "fleet-ops"
SCHEMAS = {
    "lock_doors": {},
    "set_mode": {"limit": ParameterSpec(type="int", min=0, max=250),
                 "ratio": ParameterSpec(type="float", min=0, max=1),
                 "force": ParameterSpec(type="bool"),
                 "mode": ParameterSpec(type="enum", choices=["eco", "sport"])},
}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Fleet:
    pki: pki.PkiDir
    signing_key: Path
    trusted_keys: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet")
    d = make_dev_pki(root / "pki")
    key, trusted = root / "signing" / "command.key", root / "vehicle" / "trusted-command-keys.yaml"
    assert agent_main(["pki", "command-key", "--key", str(key), "--kid", KID, "--issuer", ISSUER,
                       "--trusted-keys", str(trusted)]) == 0
    return Fleet(d, key, trusted)


@pytest.fixture(scope="module")
def broker(fleet: Fleet) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(fleet.pki) as b:
        yield b


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # cli.main configures logging for the whole process


Answer = tuple[str, str | None, dict[str, object]]  # state, reason, detail


@dataclass
class Request:
    topic: str
    payload: bytes
    verified: VerifiedCommand | None
    rejected: CommandRejected | None


@dataclass
class FakeVehicle:
    """The vehicle's side of the wire: verify each request for real, answer with scripted results."""

    broker: MosquittoBroker
    keyring: Keyring
    answers: list[Answer]
    noise: bool = True  # also send a result of another command, a malformed one and a duplicate
    requests: list[Request] = field(default_factory=list)
    seq: int = 0

    def __post_init__(self) -> None:
        self.verifier = CommandVerifier(VIN, self.keyring, SCHEMAS, clock_ms=now_ms)
        self.got = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=VIN,
                                  protocol=paho.MQTTv5)
        self.client.tls_set_context(self.broker.tls_context(VIN))
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(f"vt/{VIN}/cmd/req/+", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_request
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(WAIT):
            self.close()
            raise RuntimeError("fake vehicle did not subscribe")

    def _send(self, payload: bytes) -> None:
        self.client.publish(f"vt/{VIN}/cmd/res", payload, qos=1)  # no waiting inside paho's callback

    def _result(self, command_id: str, state: str, reason: str | None, detail: dict[str, object]) -> bytes:
        self.seq += 1
        result = CommandResult(command_id=command_id, state=state, ts_ms=now_ms(), command="set_mode",
                               reason=reason, detail=detail)  # type: ignore[arg-type]
        return ResultBatch(result, VIN, "boot-1").seal(self.seq)

    def _on_request(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            verified = self.verifier.verify(payload, StaticReplayView())
        except CommandRejected as exc:
            self.requests.append(Request(msg.topic, payload, None, exc))
            if exc.command_id is not None:  # as the agent does: only authenticated commands are answered
                state = "expired" if exc.reason == "expired" else "rejected"
                self._send(self._result(exc.command_id, state, exc.reason, {"detail": exc.detail}))
        else:
            self.requests.append(Request(msg.topic, payload, verified, None))
            if self.noise:
                self._send(self._result("some-other-command", "succeeded", None, {}))
                self._send(b"\xa1\x61v\x63bad")
            for i, (state, reason, detail) in enumerate(self.answers):
                sealed = self._result(verified.command_id, state, reason, detail)
                self._send(sealed)
                if self.noise and i == 0:
                    self._send(sealed)  # at-least-once delivery: the same result twice
        self.got.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


MakeVehicle = Callable[..., FakeVehicle]


@pytest.fixture
def vehicle_factory(broker: MosquittoBroker, fleet: Fleet) -> Iterator[MakeVehicle]:
    made: list[FakeVehicle] = []

    def make(answers: list[Answer], *, noise: bool = True) -> FakeVehicle:
        v = FakeVehicle(broker, load_keyring(fleet.trusted_keys), answers, noise=noise)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def base_args(broker: MosquittoBroker, fleet: Fleet) -> list[str]:
    return ["backend", "--host", broker.host, "--port", str(broker.port), "--pki", str(fleet.pki.root)]


def command_args(fleet: Fleet, *extra: str) -> list[str]:
    return ["command", "--vehicle", VIN, "--signing-key", str(fleet.signing_key), "--kid", KID, *extra]


# ------------------------------------------------------------------ pki command-key


def test_command_key_writes_a_0600_key_and_its_trusted_entry(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    key, trusted = tmp_path / "keys" / "sign.key", tmp_path / "trusted.yaml"
    args = ["pki", "command-key", "--key", str(key), "--kid", "k-1", "--issuer", "ops",
            "--trusted-keys", str(trusted), "--not-after", "2030-01-01T00:00:00Z"]
    assert agent_main(args) == 0
    assert f"wrote {key}" in capsys.readouterr().out
    assert mode(key) == 0o600 and mode(trusted) == 0o644
    doc = yaml.safe_load(trusted.read_text())
    public = base64.b64encode(raw_public_key(load_signing_key(key).public_key())).decode()
    assert doc == {"version": 1, "keys": [{"kid": "k-1", "issuer": "ops", "public_key": public,
                                           "not_after": "2030-01-01T00:00:00Z"}]}
    assert [k.kid for k in load_keyring(trusted)] == ["k-1"]

    # Re-running changes nothing; the key is reused, never replaced.
    before = key.read_bytes()
    assert agent_main(args) == 0
    assert "already trusted" in capsys.readouterr().out
    assert key.read_bytes() == before and yaml.safe_load(trusted.read_text()) == doc

    # A second key is appended; a kid that names another key is refused before a key is written.
    assert agent_main(["pki", "command-key", "--key", str(tmp_path / "two.key"), "--kid", "k-2",
                       "--issuer", "ops", "--trusted-keys", str(trusted)]) == 0
    assert [k.kid for k in load_keyring(trusted)] == ["k-1", "k-2"]
    assert agent_main(["pki", "command-key", "--key", str(tmp_path / "three.key"), "--kid", "k-1",
                       "--issuer", "ops", "--trusted-keys", str(trusted)]) == EX_CONFIG
    assert "already names another key" in capsys.readouterr().err
    assert not (tmp_path / "three.key").exists()

    # Without --trusted-keys the entry is printed to paste; a naive time is a usage error.
    assert agent_main(["pki", "command-key", "--key", str(tmp_path / "four.key"), "--kid", "k-4",
                       "--issuer", "ops"]) == 0
    assert "- kid: k-4\n  issuer: ops\n  public_key: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        agent_main(["pki", "command-key", "--key", str(tmp_path / "five.key"), "--kid", "k-5",
                    "--issuer", "ops", "--not-after", "2030-01-01T00:00:00"])
    assert exit_info.value.code == 2 and "has no timezone" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary files left behind


def test_dev_setup_adds_a_command_key_only_when_asked(tmp_path: Path) -> None:
    plain, with_key = tmp_path / "plain", tmp_path / "with-key"
    assert agent_main(["pki", "dev-setup", "--dir", str(plain), "--vehicle-id", VIN]) == 0
    assert not (plain / "command-signing.key").exists()
    assert not (plain / "trusted-command-keys.yaml").exists()
    for _ in range(2):  # repeatable
        assert agent_main(["pki", "dev-setup", "--dir", str(with_key), "--vehicle-id", VIN, "--command-key"]) == 0
    assert mode(with_key / "command-signing.key") == 0o600
    (key,) = load_keyring(with_key / "trusted-command-keys.yaml")
    assert (key.kid, key.issuer) == ("dev-1", "fleet-ops")
    assert raw_public_key(key.public_key) == raw_public_key(
        load_signing_key(with_key / "command-signing.key").public_key())


# ------------------------------------------------------------------ the command CLI against mosquitto


def test_signed_command_reaches_the_vehicle_and_succeeded_exits_0(
        broker: MosquittoBroker, fleet: Fleet, vehicle_factory: MakeVehicle) -> None:
    car = vehicle_factory([("accepted", None, {}), ("in_progress", None, {"step": 1}),
                           ("succeeded", None, {"latency_ms": 12})])
    before = now_ms()
    # A real process through the module entry point, like an operator runs it.
    done = subprocess.run(
        [sys.executable, "-m", "simulator", *base_args(broker, fleet), *command_args(
            fleet, "--name", "set_mode", "--param", "limit=90", "--param", "ratio=0.5", "--param", "force=true",
            "--param", "mode=eco", "--id", "cmd-0001", "--counter", "42", "--ttl", "120")],
        capture_output=True, text=True, cwd=ROOT, timeout=WAIT)
    assert done.returncode == 0, done.stdout + done.stderr
    (request,) = car.requests
    assert request.topic == f"vt/{VIN}/cmd/req/cmd-0001"
    assert request.rejected is None and request.verified is not None
    cmd = request.verified
    assert (cmd.command_id, cmd.vehicle_id, cmd.name, cmd.kid, cmd.issuer, cmd.counter) == (
        "cmd-0001", VIN, "set_mode", KID, ISSUER, 42)
    assert cmd.params == {"limit": 90, "ratio": 0.5, "force": True, "mode": "eco"}
    assert type(cmd.params["limit"]) is int and type(cmd.params["force"]) is bool
    assert cmd.expires_at_ms - cmd.issued_at_ms == 120_000 and cmd.issued_at_ms >= before
    assert cbor2.loads(request.payload)["kid"] == KID  # the CBOR form by default

    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"sent set_mode to {VIN}: id cmd-0001, counter 42")
    states = [ln.split()[3] for ln in lines[1:]]
    assert states == ["accepted", "in_progress", "succeeded"]  # the duplicate printed once
    assert lines[-1].endswith(f"{VIN} cmd-0001 succeeded detail={{\"latency_ms\":12}}")
    assert "some-other-command" not in done.stdout
    assert "ignored a result payload" in done.stderr  # the malformed one, reported and skipped


def test_json_envelope_with_default_id_and_counter_and_failed_exits_1(
        broker: MosquittoBroker, fleet: Fleet, vehicle_factory: MakeVehicle,
        capsys: pytest.CaptureFixture[str]) -> None:
    car = vehicle_factory([("accepted", None, {}), ("failed", "bus_error", {"bus": "body"})])
    before = now_ms()
    code = cli.main([*base_args(broker, fleet), *command_args(fleet, "--name", "lock_doors", "--json")])
    after = now_ms()
    out = capsys.readouterr().out
    assert code == 1, out
    (request,) = car.requests
    assert request.payload.startswith(b"{") and request.verified is not None
    cmd = request.verified
    assert request.topic == f"vt/{VIN}/cmd/req/{cmd.command_id}"
    assert len(cmd.command_id) == 36 and cmd.command_id.count("-") == 4  # a UUID4
    assert before <= cmd.counter <= after and cmd.issued_at_ms == cmd.counter
    assert cmd.expires_at_ms - cmd.issued_at_ms == 60_000
    assert f"{cmd.command_id} failed reason=bus_error detail={{\"bus\":\"body\"}}" in out


def test_vehicle_rejection_is_printed_with_its_reason_and_exits_1(
        broker: MosquittoBroker, fleet: Fleet, vehicle_factory: MakeVehicle,
        capsys: pytest.CaptureFixture[str]) -> None:
    car = vehicle_factory([("succeeded", None, {})])
    code = cli.main([*base_args(broker, fleet), *command_args(
        fleet, "--name", "set_mode", "--param", "limit=900", "--param", "ratio=0.5", "--param", "force=false",
        "--param", "mode=eco", "--id", "too-fast")])
    out = capsys.readouterr().out
    assert code == 1, out
    (request,) = car.requests
    assert request.rejected is not None and request.rejected.reason == "bad_parameters"
    assert "too-fast rejected reason=bad_parameters" in out and "above the maximum" in out


def test_no_final_result_in_time_exits_3(
        broker: MosquittoBroker, fleet: Fleet, vehicle_factory: MakeVehicle,
        capsys: pytest.CaptureFixture[str]) -> None:
    car = vehicle_factory([("accepted", None, {})], noise=False)
    code = cli.main([*base_args(broker, fleet), *command_args(fleet, "--name", "lock_doors", "--id", "slow-1",
                                                              "--timeout", "1")])
    captured = capsys.readouterr()
    assert code == 3, captured.out + captured.err
    assert len(car.requests) == 1 and car.requests[0].verified is not None
    assert "slow-1 accepted" in captured.out
    assert "no final result for slow-1 within 1 s (last state: accepted)" in captured.err


def test_no_wait_exits_0_once_the_broker_has_the_request(
        broker: MosquittoBroker, fleet: Fleet, vehicle_factory: MakeVehicle,
        capsys: pytest.CaptureFixture[str]) -> None:
    car = vehicle_factory([], noise=False)
    code = cli.main([*base_args(broker, fleet), *command_args(fleet, "--name", "lock_doors", "--id", "fire-1",
                                                              "--no-wait")])
    assert code == 0, capsys.readouterr()
    assert car.got.wait(WAIT)
    assert car.requests[0].verified is not None and car.requests[0].verified.command_id == "fire-1"


def test_usage_config_and_broker_errors(fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = command_args(fleet, "--name", "lock_doors")
    assert cli.main(["backend", *args]) == 2
    assert "--pki DIR" in capsys.readouterr().err
    port = str(free_port())
    conn = ["backend", "--port", port, "--pki", str(fleet.pki.root)]
    assert cli.main([*conn, *args, "--param", "a=1", "--param", "a=2"]) == 2
    assert "parameter a given twice" in capsys.readouterr().err
    assert cli.main([*conn, *args, "--param", "a=" + "x" * 300]) == 2
    assert "cannot build the command" in capsys.readouterr().err
    loose = tmp_path / "loose.key"
    loose.write_bytes(fleet.signing_key.read_bytes())
    os.chmod(loose, 0o644)
    assert cli.main([*conn, "command", "--vehicle", VIN, "--name", "x", "--signing-key", str(loose),
                     "--kid", KID]) == EX_CONFIG
    assert "chmod 600" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*conn, *command_args(fleet, "--name", "9lives")])
    assert exit_info.value.code == 2
    # Nothing listens there: a clear cause, status 69.
    assert cli.main([*conn, *args]) == 69
    assert "connection_refused" in capsys.readouterr().err


def test_sharing_the_identity_with_a_running_monitor_ends_with_a_hint(
        broker: MosquittoBroker, fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """Documents a limitation: the broker binds client id to CN, so the monitor and this tool
    (both 'backend') knock each other off. The tool says so instead of waiting forever."""
    p = fleet.pki
    monitor = BackendMonitor(host=broker.host, port=broker.port, ca_file=p.ca_cert, cert_file=p.cert("backend"),
                             key_file=p.key("backend"), reconnect_min_s=0.1, reconnect_max_s=0.3)
    with monitor:
        assert monitor.wait_subscribed(WAIT)
        code = cli.main([*base_args(broker, fleet), *command_args(fleet, "--name", "lock_doors",
                                                                  "--timeout", str(WAIT))])
    assert code == 69
    assert "if another client uses the identity backend" in capsys.readouterr().err


# ------------------------------------------------------------------ pure parts


def test_parameter_values_are_typed() -> None:
    assert parameter("n=42") == ("n", 42) and parameter("n=-7") == ("n", -7)
    assert parameter("x=0.25") == ("x", 0.25) and parameter("x=1e3") == ("x", 1000.0)
    assert parameter("b=true") == ("b", True) and parameter("b=false") == ("b", False)
    assert parameter("s=eco") == ("s", "eco") and parameter("s=") == ("s", "")
    assert parameter("s=1_000") == ("s", "1_000") and parameter("s=nan") == ("s", "nan")
    assert parameter("s=a=b") == ("s", "a=b")
    for bad in ("novalue", "=1", "1x=2", "x=1e999"):
        with pytest.raises(Exception, match=r"expected NAME=VALUE|parameter"):
            parameter(bad)


def test_result_follower_keeps_its_command_once_and_reports_bad_payloads() -> None:
    f = ResultFollower(VIN, "c-1")

    def sealed(command_id: str, state: str, seq: int, vehicle: str = VIN) -> bytes:
        return ResultBatch(CommandResult(command_id, state, 1_750_000_000_123), vehicle, "b").seal(seq)

    first = f.feed(sealed("c-1", "accepted", 1))
    assert isinstance(first, CommandResult) and first.state == "accepted" and f.final is None
    assert f.feed(sealed("c-1", "accepted", 1)) is None  # duplicate delivery
    assert f.feed(sealed("c-2", "succeeded", 2)) is None and f.ignored == 1
    assert "claiming vehicle" in str(f.feed(sealed("c-1", "succeeded", 3, vehicle="OTHER")))
    assert "malformed" in str(f.feed(b"\xff"))
    done = f.feed(sealed("c-1", "timed_out", 4))
    assert isinstance(done, CommandResult) and f.final == done
    line = result_line(VIN, CommandResult("c-1", "failed", 1_750_000_000_123, reason="x\x1b[2J",
                                          detail={"k": "v"}))
    assert line.endswith(f'{VIN} c-1 failed reason="x\\u001b[2J" detail={{"k":"v"}}')
