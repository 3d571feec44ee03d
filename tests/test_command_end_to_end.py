"""Remote commands end to end: a signed request over a real mosquitto with mutual TLS, the
agent's command service, the simulated vehicle's body ECU on python-can virtual buses, and the
result back through the durable outbox."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import can
import pytest

from agent.commands.envelope import VerifierSettings
from agent.commands.replay import ReplaySettings
from agent.commands.service import CommandService, RequestQueue
from agent.commands.settings import CommandSettings
from agent.config import BusOverride, CanSettings, ClockSettings
from agent.outbox import OutboxSettings
from agent.pipeline import Pipeline, PipelineSettings
from agent.profile.loader import LoadedProfile, load_profile
from agent.uplink.mqtt import MqttSettings
from agent.uplink.service import Uplink, UplinkSettings
from simulator.runner import Simulator
from simulator.testing import virtual_buses
from tests.broker import VEHICLE_ID, MosquittoBroker, make_dev_pki
from tests.command_harness import CloudClient, make_command_key

EV = Path(__file__).resolve().parent.parent / "firmware_profiles" / "ev_sedan" / "ev_sedan.yaml"
LOCKED = "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked"


@dataclass
class Vehicle:
    profile: LoadedProfile
    pipeline: Pipeline
    uplink: Uplink
    service: CommandService
    cloud: CloudClient
    frames: list[can.Message]
    simulator: Simulator | None


@pytest.fixture(scope="module")
def ev() -> LoadedProfile:
    return load_profile(EV)


@pytest.fixture
def vehicle(tmp_path: Path, ev: LoadedProfile, request: pytest.FixtureRequest) -> Iterator[Vehicle]:
    """Agent (pipeline + uplink + command service) in-process, the simulator driving, a broker."""
    faults = getattr(request, "param", frozenset())
    pki = make_dev_pki(tmp_path / "pki")
    key, trusted = make_command_key(tmp_path)
    buses = virtual_buses(ev)
    frames: list[can.Message] = []
    listener = can.Bus(interface="virtual", channel=buses["body"][1])
    notifier = can.Notifier(listener, [lambda m: frames.append(m)])
    with MosquittoBroker(pki) as broker:
        requests = RequestQueue()
        uplink = Uplink(UplinkSettings(
            outbox=OutboxSettings(path=tmp_path / "outbox.sqlite", flush_interval_ms=200),
            mqtt=MqttSettings(host=broker.host, port=broker.port, ca_file=pki.ca_cert,
                              cert_file=pki.cert(VEHICLE_ID), key_file=pki.key(VEHICLE_ID),
                              reconnect_min_s=0.2, reconnect_max_s=1)), VEHICLE_ID, inbox=requests)
        pipeline = Pipeline(ev, uplink.sink, {n: BusOverride(interface=i, channel=c) for n, (i, c) in buses.items()},
                            PipelineSettings(CanSettings(), ClockSettings(synced="assume_synced")))
        # one machine, one clock: no skew allowance, so a 1 s lifetime really ends after 1 s
        settings = CommandSettings(trusted_keys=trusted, replay=ReplaySettings(path=tmp_path / "replay.db"),
                                   verifier=VerifierSettings(max_skew_ms=0))
        service = CommandService(settings,
                                 ev, pipeline, VEHICLE_ID, uplink.publish_result, requests)
        agent = threading.Thread(target=pipeline.run, daemon=True)
        agent.start()
        assert pipeline.wait_ready(5)
        uplink.start()
        service.start()
        simulator = Simulator(ev, buses=buses, faults=set(faults))
        simulator.start()
        cloud = CloudClient(broker, VEHICLE_ID, key)
        try:
            yield Vehicle(ev, pipeline, uplink, service, cloud, frames, simulator)
        finally:
            cloud.close()
            simulator.stop()
            service.close()
            pipeline.stop()
            agent.join(10)
            uplink.close()
            notifier.stop()
            listener.shutdown()


def lock_requests(frames: list[can.Message], profile: LoadedProfile) -> list[str]:
    message = profile.databases["body"].get_message_by_name("TCU_RemoteLockRequest")
    return [str(message.decode(f.data)["TCU_LockRequest"]) for f in list(frames)
            if f.arbitration_id == message.frame_id]


def wait_value(pipeline: Pipeline, name: str, value: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = pipeline.live_values([name]).get(name)
        if live is not None and live[0] == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never became {value!r}")


def test_unlock_while_parked_then_lock_succeed_with_feedback(vehicle: Vehicle) -> None:
    wait_value(vehicle.pipeline, "Vehicle.Speed", 0)
    wait_value(vehicle.pipeline, LOCKED, "LOCKED")
    command_id = vehicle.cloud.send("unlock_doors")
    result = vehicle.cloud.final(command_id)
    assert result.state == "succeeded", result
    assert result.detail["observed"] == "UNLOCKED"
    assert vehicle.cloud.states(command_id)[:2] == ["accepted", "in_progress"]
    assert lock_requests(vehicle.frames, vehicle.profile) == ["Unlock"] * 3
    command_id = vehicle.cloud.send("lock_doors")
    result = vehicle.cloud.final(command_id)
    assert result.state == "succeeded" and result.detail["observed"] == "LOCKED"
    assert lock_requests(vehicle.frames, vehicle.profile) == ["Unlock"] * 3 + ["Lock"] * 3


@pytest.mark.parametrize("vehicle", [frozenset({"lock_actuator"})], indirect=True)
def test_failed_actuator_is_reported_not_succeeded(vehicle: Vehicle) -> None:
    wait_value(vehicle.pipeline, LOCKED, "LOCKED")
    command_id = vehicle.cloud.send("unlock_doors")
    result = vehicle.cloud.final(command_id)
    assert result.state in ("failed", "timed_out") and result.reason == "confirmation_timeout"
    assert result.detail["observed"] == "LOCKED"
    assert lock_requests(vehicle.frames, vehicle.profile) == ["Unlock"] * 3  # it was really sent


def test_unlock_refused_while_driving_and_nothing_is_sent(vehicle: Vehicle) -> None:
    assert vehicle.simulator is not None
    cycle = vehicle.simulator.cycle
    accelerate = cycle.phase("accelerate")
    assert vehicle.simulator.wait_until(accelerate.start + 3, timeout=60)
    command_id = vehicle.cloud.send("unlock_doors")
    result = vehicle.cloud.final(command_id)
    assert result.state == "failed" and result.reason == "precondition_failed", result
    assert lock_requests(vehicle.frames, vehicle.profile) == []


def test_stale_speed_fails_the_precondition(vehicle: Vehicle) -> None:
    wait_value(vehicle.pipeline, "Vehicle.Speed", 0)
    assert vehicle.simulator is not None
    vehicle.simulator.stop()  # the bus goes quiet: the last speed ages
    time.sleep(1.5)
    command_id = vehicle.cloud.send("unlock_doors")
    result = vehicle.cloud.final(command_id)
    assert result.state == "failed" and result.reason == "precondition_stale_signal", result
    assert lock_requests(vehicle.frames, vehicle.profile) == []


REJECTIONS = [
    ("wrong vehicle", dict(vehicle_id="TESTVIN0000000002"), "wrong_vehicle"),
    ("expired", dict(issued_at_ms=-600_000, ttl_s=60), "expired"),
    ("not yet valid", dict(issued_at_ms=+600_000, ttl_s=60), "not_yet_valid"),
    ("lifetime too long", dict(ttl_s=7200), "lifetime_too_long"),
    ("unknown command", dict(name="open_sunroof"), "unknown_command"),
    ("bad parameters", dict(name="set_speed_period", params={"period_ms": 5}), "bad_parameters"),
    ("unexpected parameter", dict(params={"force": True}), "bad_parameters"),
]


@pytest.mark.parametrize("case", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_rejections_over_mqtt_report_the_reason_and_send_nothing(vehicle: Vehicle, case: tuple) -> None:  # type: ignore[type-arg]
    _, overrides, reason = case
    overrides = dict(overrides)
    name = overrides.pop("name", "unlock_doors")
    params = overrides.pop("params", None)
    if "issued_at_ms" in overrides:  # relative to now
        overrides["issued_at_ms"] += int(time.time() * 1000)
    command_id = vehicle.cloud.send(name, params, **overrides)
    result = vehicle.cloud.final(command_id)
    assert result.state == ("expired" if reason == "expired" else "rejected")
    assert result.reason == reason
    assert vehicle.cloud.states(command_id) == [result.state]  # never accepted
    assert lock_requests(vehicle.frames, vehicle.profile) == []


def test_replayed_counter_is_rejected(vehicle: Vehicle) -> None:
    first = vehicle.cloud.send("status", counter=10_000)
    assert vehicle.cloud.final(first).state == "succeeded"
    second = vehicle.cloud.send("unlock_doors", counter=9_999)  # not above the last accepted
    result = vehicle.cloud.final(second)
    assert (result.state, result.reason) == ("rejected", "replayed_counter")
    assert lock_requests(vehicle.frames, vehicle.profile) == []


def _tampered_signature(vehicle: Vehicle) -> tuple[str, bytes]:
    import cbor2

    command_id, payload = vehicle.cloud.sign("unlock_doors")
    envelope = cbor2.loads(payload)
    envelope["sig"] = bytes([envelope["sig"][0] ^ 1]) + envelope["sig"][1:]
    return command_id, cbor2.dumps(envelope)


def _unknown_key(vehicle: Vehicle) -> tuple[str, bytes]:
    command_id, payload = vehicle.cloud.sign("unlock_doors")
    import cbor2

    envelope = cbor2.loads(payload)
    envelope["kid"] = "ops-unknown"
    return command_id, cbor2.dumps(envelope)


UNANSWERED = [
    ("bad signature", _tampered_signature, "bad_signature"),
    ("unknown key id", _unknown_key, "unknown_key"),
    ("too large", lambda v: ("cmd-big", b"\xa0" * 5000), "too_large"),
    ("malformed", lambda v: ("cmd-junk", b"\x00\xffnot cbor"), "malformed"),
]


@pytest.mark.parametrize("case", UNANSWERED, ids=[c[0] for c in UNANSWERED])
def test_unauthenticated_requests_are_rejected_counted_and_not_answered(vehicle: Vehicle, case: tuple) -> None:  # type: ignore[type-arg]
    _, make, reason = case
    command_id, payload = make(vehicle)
    vehicle.cloud.publish(command_id, payload)
    deadline = time.monotonic() + 10
    key = f"rejected_{reason}"
    while vehicle.service.counters.get(key, 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vehicle.service.counters.get(key) == 1
    assert vehicle.service.counters.get("accepted", 0) == 0
    time.sleep(0.5)
    assert vehicle.cloud.states(command_id) == []  # nothing authenticated to answer to
    assert lock_requests(vehicle.frames, vehicle.profile) == []
    audit = vehicle.service.store.recent_audit(5)
    assert any(entry.reason == reason for entry in audit)


def test_redelivered_command_returns_its_result_and_does_not_run_again(vehicle: Vehicle) -> None:
    command_id, payload = vehicle.cloud.sign("snapshot")
    vehicle.cloud.publish(command_id, payload)
    first = vehicle.cloud.final(command_id)
    assert first.state == "succeeded" and first.detail["samples"] > 0
    vehicle.cloud.publish(command_id, payload)  # the broker redelivers the same request
    deadline = time.monotonic() + 10
    while vehicle.cloud.states(command_id).count("succeeded") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vehicle.cloud.states(command_id).count("succeeded") == 2
    assert vehicle.cloud.states(command_id).count("accepted") == 1  # executed exactly once


def test_command_queued_while_offline_and_expired_is_reported_expired_not_run(vehicle: Vehicle) -> None:
    wait_value(vehicle.pipeline, LOCKED, "LOCKED")
    deadline = time.monotonic() + 15
    while not vehicle.uplink.publisher.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    vehicle.uplink.publisher.stop()  # the car goes offline; the broker keeps its session
    command_id = vehicle.cloud.send("unlock_doors", ttl_s=1.0)
    time.sleep(2.0)  # expired while queued in the broker
    vehicle.uplink.publisher.start()
    result = vehicle.cloud.final(command_id)
    assert result.state == "expired" and result.reason == "expired"
    assert vehicle.cloud.states(command_id) == ["expired"]
    assert lock_requests(vehicle.frames, vehicle.profile) == []
