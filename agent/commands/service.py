"""The command service: MQTT requests -> trust decision -> durable replay record -> executor
-> results through the durable outbox.

Requests arrive on the uplink's thread (:class:`~agent.uplink.mqtt.CommandInbox`) and are
handled by worker threads. A request is acknowledged to the broker only once it is finished
(rejected and audited, or executed with its result recorded). If the agent dies before that,
the broker redelivers it; the replay store, where it was recorded as accepted before it ran,
then answers with the recorded outcome (``interrupted`` when the run was cut short) instead
of running it again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from agent.commands.envelope import (
    EXPIRED,
    REPLAYED_ID,
    CommandRejected,
    CommandVerifier,
    VerifiedCommand,
)
from agent.commands.executor import CommandExecutor, parameter_specs
from agent.commands.keys import load_keyring
from agent.commands.replay import ReplayStore, ReplayUnavailable
from agent.commands.results import CommandResult, plain
from agent.commands.settings import CommandSettings
from agent.profile.loader import LoadedProfile

if TYPE_CHECKING:
    from agent.pipeline import Pipeline

log = structlog.get_logger(__name__)

PublishResult = Callable[[CommandResult], None]


Request = tuple[str, bytes, Callable[[], None]] | None


class RequestQueue:
    """The uplink's command inbox: requests wait here for the service's workers (which may
    start after the uplink connected)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Request] = queue.Queue()

    def deliver(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        self.queue.put((topic, payload, ack))


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class CommandService:
    def __init__(self, settings: CommandSettings, profile: LoadedProfile, pipeline: Pipeline,
                 vehicle_id: str, publish: PublishResult, requests: RequestQueue, *,
                 clock_ms: Callable[[], int] = _wall_ms,
                 status: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.vehicle_id = vehicle_id
        self.publish = publish
        self.clock_ms = clock_ms
        keyring = load_keyring(settings.trusted_keys)
        schemas = {c.name: parameter_specs(c) for c in profile.spec.commands}
        self.verifier = CommandVerifier.from_settings(vehicle_id, keyring, schemas, settings.verifier,
                                                      clock_ms=clock_ms)
        self.store = ReplayStore(settings.replay, clock_ms=clock_ms)
        self.executor = CommandExecutor.for_pipeline(pipeline, status=status)
        self._queue = requests.queue
        self._workers = [threading.Thread(target=self._work, name=f"commands-{i}", daemon=True)
                         for i in range(settings.workers)]
        self.counters: dict[str, int] = {}

    def start(self) -> None:
        for stored in self.store.interrupted:  # accepted before a crash: outcome unknown, never rerun
            self._report(stored.command_id, stored.name, "failed", {"reason": "interrupted"})
        for worker in self._workers:
            worker.start()

    def close(self) -> None:
        self.executor.close()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=10)
        self.store.close()

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _report(self, command_id: str, name: str | None, state: str, detail: Mapping[str, Any]) -> None:
        details = dict(detail)
        reason = details.pop("reason", None)
        result = CommandResult(command_id=command_id, state=state, ts_ms=self.clock_ms(), command=name,
                               reason=None if reason is None else str(reason),
                               detail={k: plain(v) for k, v in details.items()})
        log.info("command result", command_id=command_id, command=name, state=state, reason=reason)
        self.publish(result)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            topic, payload, ack = item
            try:
                self.handle(topic, payload, ack)
            except ReplayUnavailable as exc:  # not acked: the broker redelivers it later
                self._count("store_unavailable")
                log.error("replay store unavailable; command left for redelivery", error=str(exc))
            except Exception:  # a bug must not end the worker; the request is redelivered
                self._count("internal_error")
                log.exception("command handling failed", topic=topic)

    def handle(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        try:
            command = self.verifier.verify(payload, self.store.view())
            if topic.rsplit("/", 1)[-1] != command.command_id:
                raise CommandRejected("malformed", f"topic {topic} does not end with the command id",
                                      command_id=command.command_id, issuer=command.issuer, name=command.name)
        except CommandRejected as exc:
            self._rejected(exc)
            ack()
            return
        self.store.accept(command)  # durable: from here on it can never run twice
        self._count("accepted")
        log.info("command accepted", command_id=command.command_id, command=command.name,
                 issuer=command.issuer, counter=command.counter)
        self._report(command.command_id, command.name, "accepted", {})
        self._execute(command)
        ack()  # only now may the broker forget it; a crash before redelivers it to the replay check

    def _rejected(self, exc: CommandRejected) -> None:
        self._count(f"rejected_{exc.reason}")
        self.store.audit_rejection(exc)
        log.warning("command rejected", reason=exc.reason, detail=exc.detail, command_id=exc.command_id,
                    issuer=exc.issuer)
        if exc.command_id is None:
            return  # not authenticated: nothing to answer to
        if exc.reason == REPLAYED_ID:
            stored = self.store.result(exc.command_id)
            if stored is not None:  # a redelivery: answer with what happened, never run again
                state = stored.state if stored.finished else "in_progress"
                if state == "interrupted":
                    state = "failed"
                self._report(exc.command_id, stored.name, state, stored.result or {})
                return
        state = "expired" if exc.reason == EXPIRED else "rejected"
        self._report(exc.command_id, exc.name, state, {"reason": exc.reason, "detail": exc.detail})

    def _execute(self, command: VerifiedCommand) -> None:
        def report(state: str, detail: Mapping[str, Any]) -> None:
            self._report(command.command_id, command.name, state, detail)

        outcome = self.executor.execute(command.name, command.params, command.command_id, report)
        self.store.record_result(command.command_id, outcome.state, dict(outcome.detail))
