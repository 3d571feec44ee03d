"""Safe condition expressions over signals.

``Vehicle.Chassis.Brake.PedalPosition > 80 and Vehicle.Speed > 50`` is parsed with
:func:`ast.parse` (parsing only, nothing is executed), checked against a whitelist
of node types, and compiled into closures over a value lookup. There is no
``eval``: attribute access, calls other than ``abs``/``min``/``max``, subscripts,
comprehensions and the like are rejected when the profile is loaded.

A missing signal makes a comparison false (unknown is not true), so a trigger never
fires on data it has not seen.
"""

from __future__ import annotations

import ast
import itertools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 32

Value = float | int | str | bool
Lookup = Mapping[str, Any]
Evaluator = Callable[[Lookup], Any]


class ExpressionError(ValueError):
    """The expression is not valid; ``column`` is 1-based when known."""

    def __init__(self, message: str, column: int | None = None) -> None:
        self.column = column
        super().__init__(f"{message} (column {column})" if column else message)


class _Missing(Exception):
    pass


@dataclass(frozen=True)
class Expression:
    source: str
    signals: frozenset[str]
    _fn: Evaluator

    def evaluate(self, values: Lookup) -> bool:
        """Truth of the expression; False when a signal it needs has no value."""
        try:
            return bool(self._fn(values))
        except (_Missing, TypeError, ZeroDivisionError, OverflowError):
            return False

    def signal_pairs_compared(self) -> list[tuple[str, str]]:
        """Pairs of signals compared directly with each other (for unit checks)."""
        pairs: list[tuple[str, str]] = []
        for node in ast.walk(ast.parse(self.source, mode="eval")):
            if isinstance(node, ast.Compare):
                names = [dotted_name(n) for n in [node.left, *node.comparators]]
                for a, b in itertools.pairwise(names):
                    if a and b:
                        pairs.append((a, b))
        return pairs


_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"abs": abs, "min": min, "max": max}


def dotted_name(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def parse(source: str) -> Expression:
    """Parse and compile ``source``; raises :class:`ExpressionError` with a reason."""
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"syntax error: {exc.msg}", exc.offset) from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError("expression cannot be parsed") from None
    signals: set[str] = set()
    fn = _compile(tree.body, signals, 0)
    return Expression(source, frozenset(signals), fn)


def _col(node: ast.AST) -> int | None:
    offset = getattr(node, "col_offset", None)
    return offset + 1 if isinstance(offset, int) else None


def _compile(node: ast.AST, signals: set[str], depth: int) -> Evaluator:
    if depth > MAX_DEPTH:
        raise ExpressionError("expression nested too deeply", _col(node))
    d = depth + 1
    name = dotted_name(node)
    if name is not None:
        if name in ("true", "false", "True", "False"):
            const = name in ("true", "True")
            return lambda _v: const
        signals.add(name)

        def lookup(values: Lookup, key: str = name) -> Any:
            value = values.get(key)
            if value is None:
                raise _Missing(key)
            return value

        return lookup
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool | int | float | str):
            return lambda _v: value
        raise ExpressionError(f"unsupported constant {value!r}", _col(node))
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, signals, d) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda v: _kleene(parts, v, decisive=False)
        return lambda v: _kleene(parts, v, decisive=True)
    if isinstance(node, ast.UnaryOp):
        inner = _compile(node.operand, signals, d)
        if isinstance(node.op, ast.Not):
            return lambda v: not inner(v)
        if isinstance(node.op, ast.USub):
            return lambda v: -inner(v)
        if isinstance(node.op, ast.UAdd):
            return inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op = _BINARY[type(node.op)]
        left, right = _compile(node.left, signals, d), _compile(node.right, signals, d)
        return lambda v: op(left(v), right(v))
    if isinstance(node, ast.Compare):
        return _compile_compare(node, signals, d)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        func = _FUNCTIONS.get(node.func.id)
        if func is None or node.keywords or not node.args:
            raise ExpressionError(
                f"unknown function {node.func.id!r} (allowed: abs, min, max)", _col(node)
            )
        args = [_compile(a, signals, d) for a in node.args]
        if func is abs and len(args) != 1:
            raise ExpressionError("abs() takes one argument", _col(node))
        return lambda v: func(*(a(v) for a in args))
    raise ExpressionError(f"unsupported syntax: {type(node).__name__}", _col(node))


def _kleene(parts: list[Evaluator], values: Lookup, decisive: bool) -> bool:
    # Three-valued and/or: a missing signal is "unknown", so `x and unknown` is
    # unknown unless x already decides, and `not unknown` stays unknown.
    missing: _Missing | None = None
    for part in parts:
        try:
            if bool(part(values)) is decisive:
                return decisive
        except _Missing as exc:
            missing = exc
    if missing is not None:
        raise missing
    return not decisive


def _membership(negate: bool) -> Callable[[Any, Any], bool]:
    return lambda a, b: (a in b) != negate


def _constant(value: Any) -> Evaluator:
    return lambda _v: value


def _compile_compare(node: ast.Compare, signals: set[str], depth: int) -> Evaluator:
    operands = [_compile(node.left, signals, depth)]
    steps: list[tuple[Callable[[Any, Any], bool], Evaluator]] = []
    for op_node, comparator in zip(node.ops, node.comparators, strict=True):
        if isinstance(op_node, ast.In | ast.NotIn):
            if not isinstance(comparator, ast.Tuple | ast.List | ast.Set):
                raise ExpressionError("'in' needs a literal list, e.g. x in ('P', 'N')", _col(comparator))
            members = []
            for elt in comparator.elts:
                if not isinstance(elt, ast.Constant) or not isinstance(elt.value, int | float | str):
                    raise ExpressionError("'in' list may hold only constants", _col(elt))
                members.append(elt.value)
            choices = frozenset(members)
            negate = isinstance(op_node, ast.NotIn)
            steps.append((_membership(negate), _constant(choices)))
            continue
        op = _COMPARE.get(type(op_node))
        if op is None:
            raise ExpressionError(f"unsupported comparison {type(op_node).__name__}", _col(node))
        steps.append((op, _compile(comparator, signals, depth)))
    first = operands[0]

    def compare(values: Lookup) -> bool:
        left = first(values)
        for op, right_fn in steps:
            right = right_fn(values)
            if not op(left, right):
                return False
            left = right
        return True

    return compare
