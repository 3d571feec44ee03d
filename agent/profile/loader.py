"""Load a vehicle profile together with its CAN databases, and check that they agree.

Everything here is a :class:`~agent.errors.ConfigError` with file, line and key path;
all problems found are reported together so a person fixes them in one pass.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cantools.database.can import Database, Message, Signal
from pydantic import BaseModel, ValidationError

from agent import expr
from agent.errors import ConfigError, ConfigProblem
from agent.profile.model import (
    AggregateRule,
    CanAction,
    CommandSpec,
    ParameterSpec,
    SetRuleAction,
    SnapshotAction,
    TriggerRule,
    VehicleProfile,
)
from agent.profile.yamlsrc import Loc, SourceMap, format_path, load_yaml_file

_DB_LOADERS = {
    ".dbc": Database.add_dbc_file,
    ".kcd": Database.add_kcd_file,
    ".sym": Database.add_sym_file,
    ".arxml": Database.add_arxml_file,
}
_UNIT_ALIASES = {
    "kph": "km/h", "kmh": "km/h", "km/hr": "km/h", "deg": "°", "degree": "°",
    "degrees": "°", "percent": "%", "pct": "%", "celsius": "°c", "degc": "°c",
    "rpm": "rpm", "1/min": "rpm", "volt": "v", "ampere": "a", "amp": "a",
}


def normalise_unit(unit: str | None) -> str:
    text = (unit or "").strip().lower()
    return _UNIT_ALIASES.get(text, text)


@dataclass(frozen=True)
class CatalogSignal:
    """A canonical signal resolved to the database message and signal that carry it."""

    name: str
    bus: str
    message: Message
    signal: Signal
    unit: str
    out_of_range: str

    @property
    def is_enum(self) -> bool:
        return bool(self.signal.choices)


@dataclass(frozen=True)
class LoadedProfile:
    path: Path
    spec: VehicleProfile
    source: SourceMap
    databases: dict[str, Database]
    catalog: dict[str, CatalogSignal]
    conditions: dict[str, expr.Expression]
    preconditions: dict[str, list[expr.Expression]] = field(default_factory=dict)

    def signals_used_by_rules(self) -> set[str]:
        used: set[str] = set()
        for rule in self.spec.rules:
            if isinstance(rule, TriggerRule):
                used.update(rule.capture.signals)
                used.update(self.conditions[rule.name].signals)
            else:
                used.update(rule.signals)
        return used

    def signals_needed(self) -> set[str]:
        """Signals the agent must decode: those rules use, and those commands read
        (preconditions, confirmation, snapshots; a snapshot naming none reads the catalog)."""
        needed = self.signals_used_by_rules()
        for command in self.spec.commands:
            for condition in self.preconditions.get(command.name, []):
                needed |= condition.signals
            if command.confirm is not None:
                needed.add(command.confirm.signal)
            if isinstance(command.action, SnapshotAction):
                needed |= set(command.action.signals or self.catalog)
        return needed

    def actuation_buses(self) -> set[str]:
        return {entry.bus for entry in self.spec.actuation_allow}

    def messages_used(self) -> dict[str, set[tuple[int, bool]]]:
        """Bus name -> (frame id, extended) of the messages the agent decodes."""
        out: dict[str, set[tuple[int, bool]]] = {bus.name: set() for bus in self.spec.buses}
        for name in self.signals_needed():
            message = self.catalog[name].message
            out[self.catalog[name].bus].add((message.frame_id, message.is_extended_frame))
        return out

    def matches_firmware(self, version: str) -> bool:
        return any(fnmatch.fnmatchcase(version, p) for p in self.spec.vehicle.firmware_versions)

    def summary(self) -> str:
        spec = self.spec
        used = self.signals_used_by_rules()
        per_bus = self.messages_used()
        lines = [f"{self.path}: OK", f"  vehicle family {spec.vehicle.family}, firmware "
                 + ", ".join(spec.vehicle.firmware_versions)]
        for bus in spec.buses:
            db = self.databases[bus.name]
            n_sig = sum(len(m.signals) for m in db.messages)
            lines.append(
                f"  bus {bus.name}: {bus.interface}:{bus.channel} {bus.bitrate} bit/s"
                f"{' FD' if bus.fd else ''}, {len(db.messages)} messages / {n_sig} signals in "
                f"database, {len(per_bus[bus.name])} messages needed by rules and commands"
            )
        lines.append(f"  catalog: {len(self.catalog)} signals, {len(used)} used by rules")
        kinds: dict[str, int] = {}
        for rule in spec.rules:
            kinds[rule.type] = kinds.get(rule.type, 0) + 1
        lines.append(f"  rules: {len(spec.rules)} ("
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")
        return "\n".join(lines)


def pydantic_problems(exc: ValidationError, data: Any, source: SourceMap) -> list[ConfigProblem]:
    """Turn pydantic errors into located problems, dropping union tags from the path."""
    problems = []
    for err in exc.errors():
        loc = _data_loc(err["loc"], data)
        problems.append(source.problem(loc, _error_text(err)))
    return problems


def validate_model(model: type[BaseModel], data: Any, source: SourceMap) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(exc, data, source)) from None


def _data_loc(loc: Sequence[str | int], data: Any) -> Loc:
    out: list[str | int] = []
    node = data
    for position, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            out.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and position == len(loc) - 1:
            out.append(part)  # a missing or unknown key: name it
        # else: a union tag or a model name, not part of the document
    return tuple(out)


def _error_text(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        return f"type must be one of {ctx.get('expected_tags')}, got {ctx.get('tag')!r}"
    if kind == "union_tag_not_found":
        return "missing 'type' (one of periodic, on_change, trigger, aggregate)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} is not a valid name (pattern {ctx.get('pattern')})"
    if kind == "too_short":
        return "must not be empty"
    return str(err["msg"]).replace("Input should be", "must be")


def load_profile(path: str | Path) -> LoadedProfile:
    """Load, validate and cross-check a profile; raise ConfigError listing every problem."""
    path = Path(path)
    data, source = load_yaml_file(path)
    spec: VehicleProfile = validate_model(VehicleProfile, data, source)
    problems: list[ConfigProblem] = []
    databases = _load_databases(path, spec, source, problems)
    catalog = _resolve_catalog(spec, databases, source, problems)
    conditions = _check_rules(spec, catalog, source, problems)
    preconditions = _check_commands(spec, databases, catalog, source, problems)
    if problems:
        raise ConfigError(problems)
    return LoadedProfile(path, spec, source, databases, catalog, conditions, preconditions)


def _duplicates(names: list[str], loc_prefix: str, source: SourceMap, what: str,
                problems: list[ConfigProblem]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            problems.append(source.problem(
                (loc_prefix, i, "name"), f"duplicate {what} {name!r} (also {loc_prefix}[{seen[name]}])"))
        else:
            seen[name] = i


def _load_databases(path: Path, spec: VehicleProfile, source: SourceMap,
                    problems: list[ConfigProblem]) -> dict[str, Database]:
    _duplicates([b.name for b in spec.buses], "buses", source, "bus", problems)
    databases: dict[str, Database] = {}
    for i, bus in enumerate(spec.buses):
        if bus.data_bitrate is not None and not bus.fd:
            problems.append(source.problem(("buses", i, "data_bitrate"), "only valid with fd: true"))
        db = Database(strict=True)
        for j, name in enumerate(bus.databases):
            loc = ("buses", i, "databases", j)
            file = (path.parent / name).resolve()
            adder = _DB_LOADERS.get(file.suffix.lower())
            if adder is None:
                problems.append(source.problem(loc, f"unsupported database format {file.suffix!r} "
                                                    f"(use {', '.join(_DB_LOADERS)})"))
                continue
            try:
                adder(db, str(file))
            except FileNotFoundError:
                problems.append(source.problem(loc, f"database file not found: {file}"))
            except Exception as exc:  # cantools raises many unrelated types on bad files
                problems.append(source.problem(loc, f"cannot load {file.name}: {exc}"))
        for message in db.messages:
            if (message.is_fd or message.length > 8) and not bus.fd:
                problems.append(source.problem(
                    ("buses", i, "fd"),
                    f"message {message.name} is CAN FD ({message.length} bytes) but the bus has fd: false"))
                break
        databases[bus.name] = db
    return databases


def _resolve_catalog(spec: VehicleProfile, databases: dict[str, Database], source: SourceMap,
                     problems: list[ConfigProblem]) -> dict[str, CatalogSignal]:
    _duplicates([s.name for s in spec.signals], "signals", source, "signal", problems)
    catalog: dict[str, CatalogSignal] = {}
    for i, entry in enumerate(spec.signals):
        loc: Loc = ("signals", i)
        if entry.bus is not None:
            if entry.bus not in databases:
                problems.append(source.problem((*loc, "bus"), f"unknown bus {entry.bus!r}"))
                continue
            candidates = [entry.bus]
        else:
            candidates = [b for b, db in databases.items() if _find_message(db, entry.message)]
        found = [(b, _find_message(databases[b], entry.message)) for b in candidates]
        found = [(b, m) for b, m in found if m is not None]
        if not found:
            where = f"bus {entry.bus!r}" if entry.bus else "any bus"
            problems.append(source.problem((*loc, "message"),
                                           f"message {entry.message!r} not found on {where}"))
            continue
        if len(found) > 1:
            problems.append(source.problem((*loc, "message"), f"message {entry.message!r} is on "
                                           f"buses {[b for b, _ in found]}: set 'bus'"))
            continue
        bus_name, message = found[0]
        assert message is not None
        try:
            signal = message.get_signal_by_name(entry.signal)
        except KeyError:
            names = ", ".join(s.name for s in message.signals)
            problems.append(source.problem((*loc, "signal"),
                                           f"signal {entry.signal!r} not in message {message.name} ({names})"))
            continue
        db_unit = signal.unit or ""
        if entry.unit is not None and db_unit and normalise_unit(entry.unit) != normalise_unit(db_unit):
            problems.append(source.problem((*loc, "unit"), f"unit {entry.unit!r} disagrees with "
                                           f"the database's {db_unit!r} for {message.name}.{signal.name}"))
            continue
        catalog[entry.name] = CatalogSignal(entry.name, bus_name, message, signal,
                                            entry.unit or db_unit, entry.out_of_range)
    return catalog


def _find_message(db: Database, name: str) -> Message | None:
    try:
        return db.get_message_by_name(name)
    except KeyError:
        return None


def _check_rules(spec: VehicleProfile, catalog: dict[str, CatalogSignal], source: SourceMap,
                 problems: list[ConfigProblem]) -> dict[str, expr.Expression]:
    _duplicates([r.name for r in spec.rules], "rules", source, "rule", problems)
    known = {s.name for s in spec.signals}
    conditions: dict[str, expr.Expression] = {}

    def check_names(names: list[str], loc: Loc) -> None:
        for j, name in enumerate(names):
            if name not in known:
                problems.append(source.problem((*loc, j), f"unknown signal {name!r} (not in signals)"))

    for i, rule in enumerate(spec.rules):
        loc: Loc = ("rules", i)
        if isinstance(rule, TriggerRule):
            check_names(rule.capture.signals, (*loc, "capture", "signals"))
            try:
                condition = expr.parse(rule.condition)
            except expr.ExpressionError as exc:
                problems.append(source.problem((*loc, "condition"), f"invalid expression: {exc}"))
                continue
            for name in sorted(condition.signals - known):
                problems.append(source.problem((*loc, "condition"),
                                               f"unknown signal {name!r} in expression"))
            _check_expression_types(condition, catalog, (*loc, "condition"), source, problems)
            conditions[rule.name] = condition
            if rule.capture.sample_ms > max(rule.capture.pre_ms + rule.capture.post_ms, 1):
                problems.append(source.problem((*loc, "capture", "sample_ms"),
                                               "longer than the whole capture window"))
            continue
        check_names(rule.signals, (*loc, "signals"))
        if isinstance(rule, AggregateRule):
            for j, name in enumerate(rule.signals):
                entry = catalog.get(name)
                if entry is not None and entry.is_enum and set(rule.functions) - {"count", "last"}:
                    problems.append(source.problem((*loc, "signals", j), f"{name} is an enumeration: "
                                                   "only count and last apply"))
    return conditions


def _check_expression_types(condition: expr.Expression, catalog: dict[str, CatalogSignal], loc: Loc,
                            source: SourceMap, problems: list[ConfigProblem]) -> None:
    for a, b in condition.signal_pairs_compared():
        ea, eb = catalog.get(a), catalog.get(b)
        if ea and eb and normalise_unit(ea.unit) != normalise_unit(eb.unit):
            problems.append(source.problem(loc, f"compares {a} ({ea.unit or 'no unit'}) with "
                                                f"{b} ({eb.unit or 'no unit'}): units differ"))
    # String literals compared with an enumeration must be one of its choice names.
    for node in ast.walk(ast.parse(condition.source.strip(), mode="eval")):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = [expr.dotted_name(n) for n in operands]
        literals: list[str] = []
        for n in operands:
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                literals.append(n.value)
            elif isinstance(n, ast.Tuple | ast.List | ast.Set):
                literals += [e.value for e in n.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        for name in names:
            entry = catalog.get(name or "")
            if entry is None:
                continue
            choices = {str(v) for v in entry.signal.choices.values()} if entry.signal.choices else set()
            for literal in literals:
                if not choices:
                    problems.append(source.problem(loc, f"{name} is numeric, compared with {literal!r}"))
                elif literal not in choices:
                    problems.append(source.problem(loc, f"{literal!r} is not a value of {name} "
                                                        f"({', '.join(sorted(choices))})"))


__all__ = ["CatalogSignal", "LoadedProfile", "format_path", "load_profile", "normalise_unit",
           "pydantic_problems", "validate_model"]


SETTABLE_RULE_FIELDS = {"period_ms", "window_ms", "deadband", "min_interval_ms"}


def _check_parameter(spec: ParameterSpec, loc: Loc, source: SourceMap, problems: list[ConfigProblem]) -> None:
    if spec.type == "enum" and not spec.choices:
        problems.append(source.problem((*loc, "choices"), "an enum parameter needs choices"))
    if spec.type != "enum" and spec.choices:
        problems.append(source.problem((*loc, "choices"), f"choices apply to enums, not {spec.type}"))
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        problems.append(source.problem((*loc, "min"), f"min {spec.min} is above max {spec.max}"))


def _check_commands(spec: VehicleProfile, databases: dict[str, Database], catalog: dict[str, CatalogSignal],
                    source: SourceMap, problems: list[ConfigProblem]) -> dict[str, list[expr.Expression]]:
    _duplicates([c.name for c in spec.commands], "commands", source, "command", problems)
    allowed: set[tuple[str, str]] = set()
    for i, entry in enumerate(spec.actuation_allow):
        loc: Loc = ("actuation_allow", i)
        if entry.bus not in databases:
            problems.append(source.problem((*loc, "bus"), f"unknown bus {entry.bus!r}"))
        elif _find_message(databases[entry.bus], entry.message) is None:
            problems.append(source.problem((*loc, "message"),
                                           f"message {entry.message!r} not found on bus {entry.bus!r}"))
        allowed.add((entry.bus, entry.message))
    rule_types = {r.name: r for r in spec.rules}
    compiled: dict[str, list[expr.Expression]] = {}
    for i, command in enumerate(spec.commands):
        loc = ("commands", i)
        for name, parameter in command.parameters.items():
            _check_parameter(parameter, (*loc, "parameters", name), source, problems)

        def check_reference(value: object, where: Loc, command: CommandSpec = command) -> None:
            if isinstance(value, str) and value.startswith("$") and value[1:] not in command.parameters:
                problems.append(source.problem(where, f"{value} is not a parameter of {command.name}"))

        action = command.action
        aloc: Loc = (*loc, "action")
        if isinstance(action, CanAction):
            message = _find_message(databases[action.bus], action.message) if action.bus in databases else None
            if action.bus not in databases:
                problems.append(source.problem((*aloc, "bus"), f"unknown bus {action.bus!r}"))
            elif message is None:
                problems.append(source.problem((*aloc, "message"),
                                               f"message {action.message!r} not found on bus {action.bus!r}"))
            elif (action.bus, action.message) not in allowed:
                problems.append(source.problem((*aloc, "message"), f"{action.bus}.{action.message} is not "
                                               "in actuation_allow: commands may send only allowed messages"))
            if message is not None:
                names = {sig.name for sig in message.signals}
                for signal_name, value in action.signals.items():
                    if signal_name not in names:
                        problems.append(source.problem((*aloc, "signals", signal_name),
                                                       f"signal {signal_name!r} not in message {message.name}"))
                    check_reference(value, (*aloc, "signals", signal_name))
        elif isinstance(action, SetRuleAction):
            rule = rule_types.get(action.rule)
            if rule is None:
                problems.append(source.problem((*aloc, "rule"), f"unknown rule {action.rule!r}"))
            for field_name, parameter in action.parameters.items():
                ploc = (*aloc, "parameters", field_name)
                if field_name not in SETTABLE_RULE_FIELDS or (rule is not None and not hasattr(rule, field_name)):
                    problems.append(source.problem(ploc, f"{field_name!r} is not a settable field of rule "
                                                   f"{action.rule!r}"))
                if parameter.type not in ("int", "float"):
                    problems.append(source.problem((*ploc, "type"), "rule fields are numeric (int or float)"))
                _check_parameter(parameter, ploc, source, problems)
        else:
            for j, name in enumerate(getattr(action, "signals", [])):
                if name not in catalog:
                    problems.append(source.problem((*aloc, "signals", j), f"unknown signal {name!r}"))
        expressions = []
        for j, pre in enumerate(command.preconditions):
            ploc = (*loc, "preconditions", j, "condition")
            try:
                condition = expr.parse(pre.condition)
            except expr.ExpressionError as exc:
                problems.append(source.problem(ploc, f"invalid expression: {exc}"))
                continue
            for name in sorted(condition.signals - set(catalog)):
                problems.append(source.problem(ploc, f"unknown signal {name!r} in expression"))
            _check_expression_types(condition, catalog, ploc, source, problems)
            expressions.append(condition)
        compiled[command.name] = expressions
        if command.confirm is not None:
            if command.confirm.signal not in catalog:
                problems.append(source.problem((*loc, "confirm", "signal"),
                                               f"unknown signal {command.confirm.signal!r}"))
            check_reference(command.confirm.equals, (*loc, "confirm", "equals"))
    return compiled
