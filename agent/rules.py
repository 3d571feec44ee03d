"""Collection rules: which values leave the vehicle, and when.

Pure logic: the engine is fed decoded values with the monotonic time of their frame
(:meth:`RuleEngine.update`) and woken at its deadlines (:meth:`RuleEngine.tick`); it
never reads a clock itself except through the injected :class:`~agent.clock.Clock`
for turning monotonic times into wall-clock timestamps. Records accumulate until
:meth:`RuleEngine.drain`.

Semantics (documented in the README):

* periodic -- every ``period_ms``, the latest value of each signal, stamped with the
  time its frame was received; a reading is emitted once (no new frame, no new sample).
* on_change -- when a value differs from the last *emitted* one by more than
  ``deadband`` (any change for enumerations); within ``min_interval_ms`` of the last
  emission the newest value is held and emitted when the interval ends, so the final
  state is never lost.
* trigger -- ``condition`` is evaluated whenever one of its signals changes; on a
  rising edge (or every true evaluation, ``mode: always``) an event is captured with
  the capture signals sampled every ``sample_ms`` from ``pre_ms`` before to ``post_ms``
  after the trigger. A trigger inside ``min_interval_ms`` of the previous one is
  suppressed and counted.
* aggregate -- min/max/mean/count/last of every received value over tumbling windows
  of ``window_ms``; windows with no values emit nothing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from agent.clock import Clock
from agent.expr import Expression
from agent.profile.model import (
    AggregateRule,
    OnChangeRule,
    PeriodicRule,
    Rule,
    TriggerRule,
)
from agent.records import Aggregate, Event, Record, Sample, SignalValue

Snapshot = tuple[float, tuple[tuple[str, SignalValue], ...]]

# Fields a running rule may change (RuleEngine.reconfigure), per rule type.
RECONFIGURABLE: dict[type[Rule], frozenset[str]] = {
    PeriodicRule: frozenset({"period_ms"}),
    AggregateRule: frozenset({"window_ms"}),
    OnChangeRule: frozenset({"deadband", "min_interval_ms"}),
    TriggerRule: frozenset({"min_interval_ms"}),
}


@dataclass
class RuleStats:
    triggers_fired: int = 0
    triggers_suppressed: int = 0
    samples: int = 0
    events: int = 0
    aggregates: int = 0


class _Periodic:
    def __init__(self, rule: PeriodicRule, start: float) -> None:
        self.rule = rule
        self.period = rule.period_ms / 1000
        self.due = start + self.period
        self.emitted_at: dict[str, float] = {}


class _OnChange:
    def __init__(self, rule: OnChangeRule) -> None:
        self.rule = rule
        self.min_interval = rule.min_interval_ms / 1000
        self.last_value: dict[str, SignalValue] = {}
        self.last_emit: dict[str, float] = {}
        self.pending: dict[str, tuple[SignalValue, float]] = {}

    def significant(self, name: str, value: SignalValue) -> bool:
        if name not in self.last_value:
            return True
        last = self.last_value[name]
        if isinstance(value, str) or isinstance(last, str):
            return value != last
        if self.rule.deadband > 0:
            return abs(value - last) > self.rule.deadband
        return value != last

    def next_due(self) -> float:
        if not self.pending:
            return math.inf
        return min(self.last_emit[n] + self.min_interval for n in self.pending)


@dataclass
class _Capture:
    trigger_mono: float
    end_mono: float
    snapshots: list[Snapshot] = field(default_factory=list)


class _Trigger:
    def __init__(self, rule: TriggerRule, condition: Expression, start: float) -> None:
        self.rule = rule
        self.condition = condition
        self.sample_period = rule.capture.sample_ms / 1000
        self.pre = rule.capture.pre_ms / 1000
        self.post = rule.capture.post_ms / 1000
        self.min_interval = rule.min_interval_ms / 1000
        self.history: deque[Snapshot] = deque(maxlen=int(self.pre / self.sample_period) + 1)
        self.sample_due = start + self.sample_period
        self.last_truth = False
        self.last_fire = -math.inf
        self.captures: list[_Capture] = []


class _Aggregate:
    def __init__(self, rule: AggregateRule, start: float) -> None:
        self.rule = rule
        self.window = rule.window_ms / 1000
        self.window_start = start
        self.window_end = start + self.window
        self.acc: dict[str, list[float]] = {}  # name -> [min, max, sum, count]
        self.last: dict[str, SignalValue] = {}

    def add(self, name: str, value: SignalValue) -> None:
        self.last[name] = value
        acc = self.acc.get(name)
        if isinstance(value, str):
            if acc is None:
                self.acc[name] = [0.0, 0.0, 0.0, 1]
            else:
                acc[3] += 1
            return
        if acc is None:
            self.acc[name] = [value, value, value, 1]
        else:
            if value < acc[0]:
                acc[0] = value
            if value > acc[1]:
                acc[1] = value
            acc[2] += value
            acc[3] += 1


class RuleEngine:
    def __init__(self, rules: Iterable[Rule], conditions: dict[str, Expression], clock: Clock,
                 start: float | None = None) -> None:
        self.clock = clock
        start = clock.monotonic() if start is None else start
        self.values: dict[str, SignalValue] = {}
        self.seen: dict[str, float] = {}
        self.stats = RuleStats()
        self._out: list[Record] = []
        self._periodic: list[_Periodic] = []
        self._on_change: dict[str, list[_OnChange]] = {}
        self._on_change_rules: list[_OnChange] = []
        self._triggers: list[_Trigger] = []
        self._triggers_by_signal: dict[str, list[_Trigger]] = {}
        self._aggregates: list[_Aggregate] = []
        self._aggregates_by_signal: dict[str, list[_Aggregate]] = {}
        for rule in rules:
            if isinstance(rule, PeriodicRule):
                self._periodic.append(_Periodic(rule, start))
            elif isinstance(rule, OnChangeRule):
                oc = _OnChange(rule)
                self._on_change_rules.append(oc)
                for name in rule.signals:
                    self._on_change.setdefault(name, []).append(oc)
            elif isinstance(rule, TriggerRule):
                trig = _Trigger(rule, conditions[rule.name], start)
                self._triggers.append(trig)
                for name in trig.condition.signals:
                    self._triggers_by_signal.setdefault(name, []).append(trig)
            else:
                agg = _Aggregate(rule, start)
                self._aggregates.append(agg)
                for name in rule.signals:
                    self._aggregates_by_signal.setdefault(name, []).append(agg)

    @property
    def aggregated_signals(self) -> frozenset[str]:
        return frozenset(self._aggregates_by_signal)

    def live(self, name: str) -> tuple[SignalValue, float] | None:
        """Latest value of ``name`` and the monotonic time a frame last carried it."""
        if name not in self.values:
            return None
        return self.values[name], self.seen[name]

    # -- runtime changes ------------------------------------------------------------------
    def reconfigure(self, rule_name: str, fields: Mapping[str, float | int]) -> dict[str, float | int]:
        """Change timing fields of a rule while running; returns the rule's new field values.

        Settable: ``period_ms`` (periodic), ``window_ms`` (aggregate), ``deadband``
        (on_change), ``min_interval_ms`` (on_change, trigger). The new values pass the
        profile schema's own bounds, or nothing changes (:class:`ValueError`). Schedules
        move without a burst or a gap: the next period/window is counted from the last
        one that ran, so a shorter period takes effect at the next tick and a longer one
        extends the current wait; values already held or accumulated are kept.
        """
        state = self._find(rule_name)
        if state is None:
            raise ValueError(f"unknown rule {rule_name!r}")
        rule = state.rule
        settable = RECONFIGURABLE[type(rule)]
        wrong = sorted(set(fields) - settable)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} cannot be changed on {rule.type} rule {rule_name!r} "
                             f"(settable: {', '.join(sorted(settable))})")
        try:
            new = type(rule).model_validate({**rule.model_dump(), **fields})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid value for rule {rule_name!r}: {problems}") from None
        if isinstance(state, _Periodic):
            assert isinstance(new, PeriodicRule)
            last_run = state.due - state.period
            state.rule, state.period = new, new.period_ms / 1000
            state.due = last_run + state.period
        elif isinstance(state, _Aggregate):
            assert isinstance(new, AggregateRule)
            state.rule, state.window = new, new.window_ms / 1000
            state.window_end = state.window_start + state.window
        elif isinstance(state, _OnChange):
            assert isinstance(new, OnChangeRule)
            state.rule, state.min_interval = new, new.min_interval_ms / 1000
        else:
            assert isinstance(new, TriggerRule)
            state.rule, state.min_interval = new, new.min_interval_ms / 1000
        return {name: getattr(new, name) for name in sorted(settable)}

    def _find(self, rule_name: str) -> _Periodic | _OnChange | _Trigger | _Aggregate | None:
        states: list[_Periodic | _OnChange | _Trigger | _Aggregate] = [
            *self._periodic, *self._on_change_rules, *self._triggers, *self._aggregates]
        return next((s for s in states if s.rule.name == rule_name), None)

    # -- input ---------------------------------------------------------------------------
    def update(self, mono: float, values: Iterable[tuple[str, SignalValue]]) -> None:
        """Values decoded from one frame received at ``mono``."""
        touched: list[_Trigger] = []
        for name, value in values:
            self.seen[name] = mono
            for agg in self._aggregates_by_signal.get(name, ()):
                agg.add(name, value)
            if name in self.values and self.values[name] == value:
                continue
            self.values[name] = value
            for oc in self._on_change.get(name, ()):
                self._changed(oc, name, value, mono)
            for trig in self._triggers_by_signal.get(name, ()):
                if trig not in touched:
                    touched.append(trig)
        for trig in touched:
            self._evaluate(trig, mono)

    def repeat(self, mono: float, names: Iterable[str]) -> None:
        """A frame identical to the previous one: refresh freshness, feed aggregates."""
        for name in names:
            self.seen[name] = mono
            if name in self.values:
                for agg in self._aggregates_by_signal.get(name, ()):
                    agg.add(name, self.values[name])

    # -- rule mechanics -------------------------------------------------------------------
    def _sample(self, name: str, value: SignalValue, mono: float, rule: str) -> Sample:
        return Sample(name, self.clock.wall_ns(mono), value, rule, self.clock.synced)

    def _changed(self, oc: _OnChange, name: str, value: SignalValue, mono: float) -> None:
        if not oc.significant(name, value):
            return
        last = oc.last_emit.get(name, -math.inf)
        if mono - last < oc.min_interval:
            oc.pending[name] = (value, mono)
            return
        oc.pending.pop(name, None)
        self._emit_change(oc, name, value, mono, mono)

    def _emit_change(self, oc: _OnChange, name: str, value: SignalValue, received: float,
                     now: float) -> None:
        oc.last_value[name] = value
        oc.last_emit[name] = now
        self._out.append(self._sample(name, value, received, oc.rule.name))
        self.stats.samples += 1

    def _evaluate(self, trig: _Trigger, mono: float) -> None:
        truth = trig.condition.evaluate(self.values)
        fire = truth and (trig.rule.mode == "always" or not trig.last_truth)
        trig.last_truth = truth
        if not fire:
            return
        if mono - trig.last_fire < trig.min_interval:
            self.stats.triggers_suppressed += 1
            return
        trig.last_fire = mono
        self.stats.triggers_fired += 1
        capture = _Capture(mono, mono + trig.post)
        capture.snapshots = [s for s in trig.history if s[0] >= mono - trig.pre - 1e-9]
        capture.snapshots.append(self._snapshot(trig, mono))
        trig.captures.append(capture)

    def _snapshot(self, trig: _Trigger, mono: float) -> Snapshot:
        values = tuple((n, self.values[n]) for n in trig.rule.capture.signals if n in self.values)
        return (mono, values)

    def _finish(self, trig: _Trigger, capture: _Capture) -> None:
        synced = self.clock.synced
        samples = tuple(
            Sample(name, self.clock.wall_ns(mono), value, trig.rule.name, synced)
            for mono, values in capture.snapshots
            for name, value in values
        )
        self._out.append(Event(trig.rule.name, self.clock.wall_ns(capture.trigger_mono),
                               trig.rule.condition, samples, synced))
        self.stats.events += 1

    # -- time -----------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Run everything due at or before ``now`` (monotonic seconds)."""
        for p in self._periodic:
            if now >= p.due:
                self._run_periodic(p)
                p.due += p.period * max(1, math.floor((now - p.due) / p.period) + 1)
        for oc in self._on_change_rules:
            for name, (value, received) in list(oc.pending.items()):
                if now >= oc.last_emit[name] + oc.min_interval:
                    del oc.pending[name]
                    self._emit_change(oc, name, value, received, now)
        for trig in self._triggers:
            while now >= trig.sample_due:
                snap = self._snapshot(trig, trig.sample_due)
                trig.history.append(snap)
                for capture in trig.captures:
                    if capture.trigger_mono < trig.sample_due <= capture.end_mono + 1e-9:
                        capture.snapshots.append(snap)
                trig.sample_due += trig.sample_period
                if now - trig.sample_due > trig.pre + trig.post + trig.sample_period:
                    # Stalled for longer than any window: skip ahead instead of replaying.
                    trig.sample_due = now
            for capture in list(trig.captures):
                if now >= capture.end_mono:
                    trig.captures.remove(capture)
                    self._finish(trig, capture)
        for agg in self._aggregates:
            if now >= agg.window_end:
                self._close_window(agg)
                missed = math.floor((now - agg.window_end) / agg.window)
                agg.window_start = agg.window_end + missed * agg.window
                agg.window_end = agg.window_start + agg.window

    def _run_periodic(self, p: _Periodic) -> None:
        for name in p.rule.signals:
            received = self.seen.get(name)
            if received is None or name not in self.values or p.emitted_at.get(name) == received:
                continue
            p.emitted_at[name] = received
            self._out.append(self._sample(name, self.values[name], received, p.rule.name))
            self.stats.samples += 1

    def _close_window(self, agg: _Aggregate) -> None:
        start_ns, end_ns = self.clock.wall_ns(agg.window_start), self.clock.wall_ns(agg.window_end)
        wanted = agg.rule.functions
        for name, (lo, hi, total, count) in agg.acc.items():
            numeric = not isinstance(agg.last[name], str)
            stats: dict[str, SignalValue] = {}
            for fn in wanted:
                if fn == "count":
                    stats["count"] = int(count)
                elif fn == "last":
                    stats["last"] = agg.last[name]
                elif numeric:
                    stats[fn] = {"min": lo, "max": hi, "mean": total / count}[fn]
            self._out.append(Aggregate(name, agg.rule.name, start_ns, end_ns, stats,
                                       self.clock.synced))
            self.stats.aggregates += 1
        agg.acc.clear()
        agg.last.clear()

    def next_deadline(self) -> float:
        due = [p.due for p in self._periodic]
        due += [oc.next_due() for oc in self._on_change_rules]
        due += [t.sample_due for t in self._triggers]
        due += [c.end_mono for t in self._triggers for c in t.captures]
        due += [a.window_end for a in self._aggregates]
        return min(due, default=math.inf)

    def drain(self) -> list[Record]:
        out, self._out = self._out, []
        return out

    def flush(self, now: float) -> None:
        """At shutdown: close open captures and windows so nothing collected is lost."""
        self.tick(now)
        for trig in self._triggers:
            for capture in trig.captures:
                self._finish(trig, capture)
            trig.captures.clear()
        for agg in self._aggregates:
            if agg.acc:
                agg.window_end = now
                self._close_window(agg)
