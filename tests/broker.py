"""A real mosquitto with mutual TLS for tests: dev PKI, config + ACL, start/stop/restart.

Plain helpers so any test module (or tests/conftest.py) can wire them into fixtures::

    pki = make_dev_pki(tmp_path / "pki")
    with MosquittoBroker(pki) as broker:
        ...  # broker.host, broker.port, broker.log_text(), broker.restart()

The broker's own files live in a fresh directory under /tmp because mosquitto, started
as root, drops to the ``mosquitto`` user before reading them, and that user cannot enter
pytest's 0700 tmp directories. Its stderr is captured to ``mosquitto.log``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent import pki as agent_pki
from agent.uplink.broker_config import AclPolicy, BrokerConfig, BrokerFiles, write_broker_config

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
VEHICLE_ID = "TESTVIN0000000001"
OTHER_VEHICLE_ID = "TESTVIN0000000002"
BACKEND = "backend"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def make_dev_pki(
    directory: Path, vehicle_ids: tuple[str, ...] = (VEHICLE_ID, OTHER_VEHICLE_ID)
) -> agent_pki.PkiDir:
    """CA, broker (localhost/127.0.0.1), backend and vehicles issued through CSRs."""
    d = agent_pki.PkiDir(Path(directory))
    agent_pki.dev_setup(d, vehicle_ids, backend_name=BACKEND)
    return d


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class MosquittoBroker:
    """One mosquitto process on a loopback port; restartable on the same port."""

    host = LOOPBACK

    def __init__(
        self,
        pki: agent_pki.PkiDir,
        *,
        port: int | None = None,
        acl: AclPolicy | None = None,
        server_identity: str = "broker",
        bind_client_id: bool = True,
        persistence: bool = False,
    ) -> None:
        self.pki = pki
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="vt-mosquitto-"))
        self.files: BrokerFiles = write_broker_config(
            self.workdir,
            BrokerConfig(
                port=self.port, acl=acl or AclPolicy(), bind_client_id_to_identity=bind_client_id,
                persistence=persistence,
            ),
            ca_cert=pki.ca_cert,
            broker_cert=pki.cert(server_identity),
            broker_key=pki.key(server_identity),
        )
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def start(self, timeout: float = 15.0) -> None:
        if self._proc is not None:
            raise RuntimeError("broker already running")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.files.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._accepts_tls():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"mosquitto exited with {code}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not accept TLS in {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        proc.send_signal(signal.SIGCONT)  # a paused broker must wake up to exit
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung broker)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: a crash; works on a paused broker too."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None:
            raise RuntimeError("broker not running")
        self._proc.send_signal(sig)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- observation

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """Wait until a log line contains ``text``; return that line."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [ln for ln in self.log_text().splitlines() if text in ln]
            return bool(found)

        wait_until(seen, timeout, f"mosquitto log line containing {text!r}")
        return found[0]

    def tls_context(self, identity: str | None = BACKEND) -> ssl.SSLContext:
        """A verifying client context, optionally with a client identity from the PKI."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.pki.ca_cert))
        if identity is not None:
            ctx.load_cert_chain(str(self.pki.cert(identity)), str(self.pki.key(identity)))
        return ctx

    def _accepts_tls(self) -> bool:
        ctx = self.tls_context()
        ctx.check_hostname = False  # readiness only; also serves brokers with odd names
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=1.0) as raw,
                ctx.wrap_socket(raw) as tls,
            ):
                tls.do_handshake()
                tls.unwrap()
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """A paho client with a fleet identity (default: the backend) that records messages.

    It re-subscribes on every (re)connect, so it survives broker restarts. The broker
    binds client id to certificate CN, so only one Subscriber per identity may be open
    at a time (a second one would take over the first one's session).
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        topic: str = "vt/#",
        identity: str = BACKEND,
        client_id: str | None = None,
        check_hostname: bool = True,
    ) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or identity,
            protocol=paho.MQTTv5,
        )
        ctx = broker.tls_context(identity)
        ctx.check_hostname = check_hostname  # off only to observe a deliberately misnamed broker
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(15):
            self.close()
            raise RuntimeError("subscriber did not get SUBACK")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        self.subscribed.clear()
        client.subscribe(self.topic, qos=1)

    def _on_disconnect(self, *_: Any) -> None:
        self.subscribed.clear()

    def _on_subscribe(self, *_: Any) -> None:
        self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def messages(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.messages(topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
