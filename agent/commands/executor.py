"""Run a verified remote command on the vehicle and report how it went.

The verifier (:mod:`agent.commands.envelope`) decides whether a command may run; this
module runs it. All I/O is injected -- live signal values, CAN transmit, record output,
status, rule changes and the clock -- so the logic is tested without a vehicle, and
:meth:`CommandExecutor.for_pipeline` wires it to a running :class:`~agent.pipeline.Pipeline`.

:meth:`CommandExecutor.execute` is synchronous (run it on a worker thread) and reports
states through ``report(state, detail)``:

* ``rejected`` alone -- the command never started: ``unknown_command``,
  ``bad_parameters`` (the profile's parameter specs, checked again here), or
  ``rate_limited`` (sliding window per command, with ``retry_after_s``). A rejected
  command does not count against the rate limit.
* ``in_progress``, then exactly one of ``succeeded`` / ``failed`` / ``timed_out``.

Every non-success detail has a machine-readable ``reason``:

======================================  =========================================================
``precondition_missing_signal``         a signal the condition reads has no value (``signals``)
``precondition_stale_signal``           older than ``max_age_ms`` (``age_ms`` per signal)
``precondition_failed``                 the condition is false (``values`` it saw)
``actuation_not_allowed``               (bus, message) not in ``actuation_allow`` (checked
                                        again here, whatever the loader said)
``encode_failed``                       the database refuses the values (strict ranges)
``bus_unavailable``                     the bus is not open or the send failed (``frames_sent``)
``bus_busy``                            another command held the bus for ``bus_wait_s``
``confirmation_timeout``                the feedback signal did not reach the expected value:
                                        state ``failed`` when it updated with another value,
                                        ``timed_out`` when no update arrived after the
                                        actuation (``observed``, ``expected``, ``updated``)
``invalid_rule_change``                 the rule engine refused a set_rule
``agent_stopping``                      :meth:`close` was called while the command waited
``internal_error``                      a bug; logged with its traceback
======================================  =========================================================

CAN actuation sends only messages of the profile's databases that ``actuation_allow``
lists, encoded by cantools (scaling, strict ranges) from the action's constants and
``$parameter`` references; other signals take their database initial value (or 0), and
counters (names ending in ``Counter``) advance by one per frame sent, per message, for
the life of the executor. There is no way to send a frame given as bytes. One command
at a time per bus: the bus lock is held from the precondition check through the frames
and the confirmation, so frames of two commands never interleave and a confirmation is
never satisfied by the other command's effect.

Times: ``live`` returns monotonic receive times from the same clock as ``clock.monotonic``
(the pipeline's); a confirmation counts only a value received after the first frame went out.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import can
import structlog
from cantools.database.can import Message, Signal
from cantools.database.errors import EncodeError

from agent.clock import Clock
from agent.commands.schema import ParameterProblem, ParameterValue, check_parameters, value_problem
from agent.errors import BusUnavailable
from agent.profile.loader import LoadedProfile
from agent.profile.model import (
    CanAction,
    CommandSpec,
    Confirmation,
    ParameterSpec,
    SetRuleAction,
    SnapshotAction,
)
from agent.records import Record, Sample, SignalValue

if TYPE_CHECKING:
    from agent.pipeline import Pipeline

log = structlog.get_logger(__name__)

# States (agent.commands.results.STATES names the same ones on the wire).
IN_PROGRESS: Final = "in_progress"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
REJECTED: Final = "rejected"

# Reasons.
UNKNOWN_COMMAND: Final = "unknown_command"
BAD_PARAMETERS: Final = "bad_parameters"
RATE_LIMITED: Final = "rate_limited"
PRECONDITION_MISSING_SIGNAL: Final = "precondition_missing_signal"
PRECONDITION_STALE_SIGNAL: Final = "precondition_stale_signal"
PRECONDITION_FAILED: Final = "precondition_failed"
ACTUATION_NOT_ALLOWED: Final = "actuation_not_allowed"
ENCODE_FAILED: Final = "encode_failed"
BUS_UNAVAILABLE: Final = "bus_unavailable"
BUS_BUSY: Final = "bus_busy"
CONFIRMATION_TIMEOUT: Final = "confirmation_timeout"
INVALID_RULE_CHANGE: Final = "invalid_rule_change"
AGENT_STOPPING: Final = "agent_stopping"
INTERNAL_ERROR: Final = "internal_error"

SNAPSHOT_RULE: Final = "snapshot"  # the ``rule`` of samples a snapshot command emits

Detail = dict[str, Any]
Report = Callable[[str, Detail], None]
LiveReader = Callable[[Iterable[str]], Mapping[str, tuple[SignalValue, float]]]
Transmit = Callable[[str, can.Message], None]
Emit = Callable[[list[Record]], None]
Reconfigure = Callable[[str, Mapping[str, float | int]], Mapping[str, float | int]]


@dataclass(frozen=True)
class Outcome:
    """The final state of one command and its detail (also passed to ``report``)."""

    state: str
    detail: Detail


def parameter_specs(command: CommandSpec) -> dict[str, ParameterSpec]:
    """The parameters a command takes: its own, and for set_rule the rule fields it may set.

    A set_rule command's parameters are named after the rule fields
    (``set_speed_period(period_ms=...)``); give this mapping to the verifier.
    """
    specs = dict(command.parameters)
    if isinstance(command.action, SetRuleAction):
        for name, spec in command.action.parameters.items():
            specs.setdefault(name, spec)
    return specs


def is_counter(signal: Signal) -> bool:
    return signal.name.lower().endswith("counter")


def raw_range(signal: Signal) -> tuple[int, int]:
    """Raw values a signal can carry: its bit width, narrowed by the database min/max."""
    if signal.is_signed:
        lo, hi = -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
    else:
        lo, hi = 0, (1 << signal.length) - 1
    scale, offset = float(signal.scale), float(signal.offset)
    if scale > 0:
        if signal.minimum is not None:
            lo = max(lo, math.ceil((signal.minimum - offset) / scale - 1e-9))
        if signal.maximum is not None:
            hi = min(hi, math.floor((signal.maximum - offset) / scale + 1e-9))
    return lo, max(lo, hi)


def _physical(signal: Signal, raw: int) -> int | float:
    if signal.scale == 1 and signal.offset == 0:
        return raw
    return raw * signal.scale + signal.offset


def _same(observed: SignalValue, expected: ParameterValue) -> bool:
    """Equality across the value kinds: enum names as text, numbers numerically."""
    if isinstance(observed, str) or isinstance(expected, str):
        return isinstance(observed, str) and isinstance(expected, str) and observed == expected
    return math.isclose(float(observed), float(expected), rel_tol=1e-9, abs_tol=1e-9)


def _resolve(value: ParameterValue, params: Mapping[str, ParameterValue]) -> ParameterValue:
    """A constant, or the parameter a ``$name`` reference names."""
    if isinstance(value, str) and value.startswith("$"):
        return params[value[1:]]
    return value


class CommandExecutor:
    """Executes the profile's commands. Thread-safe: one instance serves every worker thread."""

    def __init__(self, profile: LoadedProfile, *, live: LiveReader, transmit: Transmit, emit: Emit,
                 status: Callable[[], Mapping[str, Any]], reconfigure: Reconfigure, clock: Clock,
                 bus_wait_s: float = 30.0, poll_s: float = 0.02) -> None:
        self.profile = profile
        self._live = live
        self._transmit = transmit
        self._emit = emit
        self._status = status
        self._reconfigure = reconfigure
        self.clock = clock
        self.bus_wait_s = bus_wait_s
        self.poll_s = poll_s
        self._commands = {c.name: c for c in profile.spec.commands}
        self._allowed = frozenset((a.bus, a.message) for a in profile.spec.actuation_allow)
        self._bus_locks = {b.name: threading.Lock() for b in profile.spec.buses}
        self._bus_fd = {b.name: b.fd for b in profile.spec.buses}
        self._rate_lock = threading.Lock()
        self._accepted: dict[str, deque[float]] = {}
        self._counters: dict[tuple[str, str, str], int] = {}  # guarded by the bus lock
        self._stopping = threading.Event()

    @classmethod
    def for_pipeline(cls, pipeline: Pipeline, *, status: Callable[[], Mapping[str, Any]] | None = None,
                     emit: Emit | None = None, **kwargs: Any) -> CommandExecutor:
        """Wired to a pipeline: its live values, buses, rule engine, clock and sink."""
        return cls(pipeline.profile, live=pipeline.live_values, transmit=pipeline.transmit,
                   emit=emit or pipeline.emit_records, status=status or pipeline.stats,
                   reconfigure=pipeline.reconfigure_rule, clock=pipeline.clock, **kwargs)

    def close(self) -> None:
        """Make commands that are waiting (between frames, for a confirmation) end now."""
        self._stopping.set()

    # -- entry point --------------------------------------------------------------------
    def execute(self, command_name: str, parameters: Mapping[str, ParameterValue], command_id: str,
                report: Report) -> Outcome:
        """Run one command; ``report`` gets ``in_progress`` then the outcome (or ``rejected``)."""
        clog = log.bind(command_id=command_id, command=command_name)
        outcome = self._admit(command_name, parameters)
        if isinstance(outcome, Outcome):
            clog.warning("command rejected", **outcome.detail)
            report(outcome.state, outcome.detail)
            return outcome
        command, params = outcome
        report(IN_PROGRESS, {})
        started = time.monotonic()
        try:
            result = self._run(command, params)
        except Exception as exc:  # a bug must still end the command with a result
            clog.exception("command failed unexpectedly")
            result = Outcome(FAILED, {"reason": INTERNAL_ERROR, "error": type(exc).__name__})
        clog.info("command finished", state=result.state, elapsed_s=round(time.monotonic() - started, 3),
                  **result.detail)
        report(result.state, result.detail)
        return result

    def _admit(self, name: str, parameters: Mapping[str, ParameterValue]
               ) -> Outcome | tuple[CommandSpec, dict[str, ParameterValue]]:
        command = self._commands.get(name)
        if command is None:
            return Outcome(REJECTED, {"reason": UNKNOWN_COMMAND, "error": f"the profile has no command {name!r}"})
        try:
            params = check_parameters(parameter_specs(command), parameters)
        except ParameterProblem as exc:
            return Outcome(REJECTED, {"reason": BAD_PARAMETERS, "error": str(exc)})
        action = command.action
        if isinstance(action, SetRuleAction):
            # The rule's own bounds hold even if the command declares looser ones.
            problems = [f"{field}: {problem}" for field, spec in action.parameters.items()
                        if field in params and (problem := value_problem(spec, params[field]))]
            if problems:
                return Outcome(REJECTED, {"reason": BAD_PARAMETERS, "error": "; ".join(problems)})
        limit = command.rate_limit
        if limit is not None:
            with self._rate_lock:
                now = self.clock.monotonic()
                accepted = self._accepted.setdefault(name, deque())
                while accepted and now - accepted[0] >= limit.per_s:
                    accepted.popleft()
                if len(accepted) >= limit.max_commands:
                    return Outcome(REJECTED, {
                        "reason": RATE_LIMITED, "max_commands": limit.max_commands, "per_s": limit.per_s,
                        "retry_after_s": round(accepted[0] + limit.per_s - now, 3)})
                accepted.append(now)
        return command, params

    # -- running ------------------------------------------------------------------------
    def _run(self, command: CommandSpec, params: dict[str, ParameterValue]) -> Outcome:
        action = command.action
        guard: AbstractContextManager[object] = nullcontext()
        if isinstance(action, CanAction):
            lock = self._bus_locks.get(action.bus)
            if lock is None:
                return Outcome(FAILED, {"reason": BUS_UNAVAILABLE, "error": f"unknown bus {action.bus}"})
            if not lock.acquire(timeout=self.bus_wait_s):
                return Outcome(FAILED, {"reason": BUS_BUSY, "bus": action.bus, "waited_s": self.bus_wait_s})
            guard = _Release(lock)
        with guard:
            failure = self._check_preconditions(command)
            if failure is not None:
                return Outcome(FAILED, failure)
            started = self.clock.monotonic()
            if isinstance(action, CanAction):
                result = self._actuate(action, params)
            elif isinstance(action, SnapshotAction):
                result = self._snapshot(action)
            elif isinstance(action, SetRuleAction):
                result = self._set_rule(action, params)
            else:
                result = Outcome(SUCCEEDED, dict(self._status()))
            if result.state != SUCCEEDED or command.confirm is None:
                return result
            return self._confirm(command.confirm, params, started, result.detail)

    def _check_preconditions(self, command: CommandSpec) -> Detail | None:
        expressions = self.profile.preconditions.get(command.name, [])
        for pre, expression in zip(command.preconditions, expressions, strict=True):
            names = sorted(expression.signals)
            live = self._live(names)
            now = self.clock.monotonic()
            missing = [n for n in names if n not in live]
            if missing:
                return {"reason": PRECONDITION_MISSING_SIGNAL, "condition": pre.condition, "signals": missing}
            limit = pre.max_age_ms / 1000
            stale = {n: round((now - live[n][1]) * 1000) for n in names if now - live[n][1] > limit}
            if stale:
                return {"reason": PRECONDITION_STALE_SIGNAL, "condition": pre.condition, "age_ms": stale,
                        "max_age_ms": pre.max_age_ms}
            values = {n: live[n][0] for n in names}
            if not expression.evaluate(values):
                return {"reason": PRECONDITION_FAILED, "condition": pre.condition, "values": values}
        return None

    def _actuate(self, action: CanAction, params: Mapping[str, ParameterValue]) -> Outcome:
        where = {"bus": action.bus, "message": action.message}
        if (action.bus, action.message) not in self._allowed:
            log.error("actuation not in actuation_allow; nothing sent", **where)
            return Outcome(FAILED, {"reason": ACTUATION_NOT_ALLOWED, **where})
        database = self.profile.databases.get(action.bus)
        try:
            message = database.get_message_by_name(action.message) if database is not None else None
        except KeyError:
            message = None
        if message is None:
            return Outcome(FAILED, {"reason": ACTUATION_NOT_ALLOWED, **where, "error": "not in the database"})
        try:
            frames = self._frames(action, message, params)
        except (EncodeError, KeyError, ValueError, TypeError, OverflowError) as exc:
            return Outcome(FAILED, {"reason": ENCODE_FAILED, **where, "error": str(exc)})
        for index, (frame, counters) in enumerate(frames):
            if index and self._stopping.wait(action.interval_ms / 1000):
                return Outcome(FAILED, {"reason": AGENT_STOPPING, "frames_sent": index})
            try:
                self._transmit(action.bus, frame)
            except (BusUnavailable, can.CanError, OSError) as exc:
                return Outcome(FAILED, {"reason": BUS_UNAVAILABLE, "bus": action.bus, "frames_sent": index,
                                        "error": str(exc)})
            self._counters.update(counters)
        return Outcome(SUCCEEDED, {"frames_sent": len(frames)})

    def _frames(self, action: CanAction, message: Message, params: Mapping[str, ParameterValue]
                ) -> list[tuple[can.Message, dict[tuple[str, str, str], int]]]:
        """Every frame of the action, encoded before the first is sent, with its counter values."""
        values: dict[str, int | float | str] = {}
        counters: list[tuple[Signal, tuple[str, str, str], tuple[int, int]]] = []
        for signal in message.signals:
            if signal.name in action.signals:
                value = _resolve(action.signals[signal.name], params)
                values[signal.name] = int(value) if isinstance(value, bool) else value
            elif is_counter(signal):
                counters.append((signal, (action.bus, message.name, signal.name), raw_range(signal)))
            else:
                raw = signal.raw_initial
                values[signal.name] = 0 if raw is None else _physical(signal, int(raw))
        fd = bool(message.is_fd or (self._bus_fd.get(action.bus, False) and message.length > 8))
        frames = []
        for index in range(action.repeat):
            after_send: dict[tuple[str, str, str], int] = {}
            for signal, key, (lo, hi) in counters:
                raw = lo + (self._counters.get(key, lo) - lo + index) % (hi - lo + 1)
                values[signal.name] = _physical(signal, raw)
                after_send[key] = lo if raw >= hi else raw + 1
            data = message.encode(values, scaling=True, strict=True)
            frames.append((can.Message(arbitration_id=message.frame_id, is_extended_id=message.is_extended_frame,
                                       is_fd=fd, bitrate_switch=fd, data=data), after_send))
        return frames

    def _confirm(self, confirm: Confirmation, params: Mapping[str, ParameterValue], started: float,
                 detail: Detail) -> Outcome:
        expected = _resolve(confirm.equals, params)
        deadline = started + confirm.timeout_ms / 1000
        last: tuple[SignalValue, float] | None = None
        while True:
            live = self._live([confirm.signal]).get(confirm.signal)
            now = self.clock.monotonic()
            if live is not None:
                last = live
                if live[1] > started and _same(live[0], expected):
                    return Outcome(SUCCEEDED, {**detail, "observed": live[0],
                                               "after_ms": round((live[1] - started) * 1000)})
            if now >= deadline:
                break
            if self._stopping.wait(min(self.poll_s, deadline - now)):
                return Outcome(FAILED, {**detail, "reason": AGENT_STOPPING})
        updated = last is not None and last[1] > started
        return Outcome(FAILED if updated else TIMED_OUT, {
            **detail, "reason": CONFIRMATION_TIMEOUT, "signal": confirm.signal, "expected": expected,
            "observed": last[0] if last is not None else None, "updated": updated,
            "timeout_ms": confirm.timeout_ms})

    def _snapshot(self, action: SnapshotAction) -> Outcome:
        names = list(action.signals) or sorted(self.profile.catalog)
        live = self._live(names)
        synced = self.clock.synced
        samples: list[Record] = [Sample(n, self.clock.wall_ns(live[n][1]), live[n][0], SNAPSHOT_RULE, synced)
                                 for n in names if n in live]
        if samples:
            self._emit(samples)
        return Outcome(SUCCEEDED, {"samples": len(samples), "missing": [n for n in names if n not in live]})

    def _set_rule(self, action: SetRuleAction, params: Mapping[str, ParameterValue]) -> Outcome:
        fields: dict[str, float | int] = {}
        for name in action.parameters:
            value = params.get(name)
            if value is not None and not isinstance(value, bool | str):
                fields[name] = value
        try:
            new = self._reconfigure(action.rule, fields)
        except ValueError as exc:
            return Outcome(FAILED, {"reason": INVALID_RULE_CHANGE, "rule": action.rule, "error": str(exc)})
        return Outcome(SUCCEEDED, {"rule": action.rule, **new})


class _Release(AbstractContextManager[object]):
    """Releases a lock that was acquired (with a timeout) before the ``with``."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


__all__ = ["CommandExecutor", "Outcome", "parameter_specs"]
