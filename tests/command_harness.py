"""Signing commands and reading results as the cloud does, against a real mosquitto."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.commands.envelope import sign_command
from agent.commands.keys import add_trusted_key, generate_signing_key, load_signing_key
from agent.commands.results import CommandResult, decode_result
from tests.broker import BACKEND, MosquittoBroker

FINAL = {"rejected", "succeeded", "failed", "timed_out", "expired"}


def make_command_key(directory: Path, kid: str = "ops-1", issuer: str = "fleet-ops") -> tuple[Path, Path]:
    """A signing key and the vehicle's trusted-keys file listing it."""
    key = directory / "command-signing.key"
    trusted = directory / "trusted-command-keys.yaml"
    add_trusted_key(trusted, generate_signing_key(key, kid=kid, issuer=issuer))
    return key, trusted


class CloudClient:
    """The operator's side: signs commands, publishes them, collects results (backend identity)."""

    def __init__(self, broker: MosquittoBroker, vehicle_id: str, signing_key: Path, kid: str = "ops-1") -> None:
        self.vehicle_id = vehicle_id
        self.key = load_signing_key(signing_key)
        self.kid = kid
        self.results: list[CommandResult] = []
        self.seqs: list[int] = []
        self._cond = threading.Condition()
        self._counter = int(time.time() * 1000)
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=BACKEND,
                                  protocol=paho.MQTTv5)
        self.client.tls_set_context(broker.tls_context())
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(f"vt/{vehicle_id}/cmd/res", qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(15), "cloud client could not subscribe"

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        decoded = decode_result(bytes(message.payload))
        with self._cond:
            self.results.append(decoded.result)
            self.seqs.append(decoded.seq)
            self._cond.notify_all()

    def sign(self, name: str, params: dict[str, Any] | None = None, *, ttl_s: float = 60,
             command_id: str | None = None, vehicle_id: str | None = None, counter: int | None = None,
             issued_at_ms: int | None = None) -> tuple[str, bytes]:
        command_id = command_id or f"cmd-{uuid.uuid4().hex[:16]}"
        now = issued_at_ms or int(time.time() * 1000)
        if counter is None:
            self._counter += 1
            counter = self._counter
        payload = sign_command(command_id=command_id, vehicle_id=vehicle_id or self.vehicle_id, name=name,
                               params=params or {}, issued_at_ms=now, expires_at_ms=now + int(ttl_s * 1000),
                               counter=counter, private_key=self.key, kid=self.kid)
        return command_id, payload

    def publish(self, command_id: str, payload: bytes) -> None:
        info = self.client.publish(f"vt/{self.vehicle_id}/cmd/req/{command_id}", payload, qos=1)
        info.wait_for_publish(10)

    def send(self, name: str, params: dict[str, Any] | None = None, **kw: Any) -> str:
        command_id, payload = self.sign(name, params, **kw)
        self.publish(command_id, payload)
        return command_id

    def states(self, command_id: str) -> list[str]:
        """States reported for a command, in the vehicle's order (sequence numbers): the outbox
        may publish a newer result before an older one."""
        with self._cond:
            pairs = sorted(zip(self.seqs, self.results, strict=True), key=lambda p: p[0])
            return [r.state for _, r in pairs if r.command_id == command_id]

    def final(self, command_id: str, timeout: float = 30) -> CommandResult:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.results:
                    if r.command_id == command_id and r.state in FINAL:
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no final result for {command_id}: {self.states(command_id)}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
