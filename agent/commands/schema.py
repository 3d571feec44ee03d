"""Parameter schema of remote commands: which parameters a command takes and their ranges.

Pure logic. The vehicle profile's ``commands:`` section describes each parameter with
``type`` (int, float, bool, enum), ``min``/``max`` (inclusive, numbers only), ``choices``
(enum only) and ``default``; a parameter without a default is required, one with a
default may be left out and then takes it. :class:`ParameterSpecLike` is that shape as a
protocol (``agent.profile.model.ParameterSpec`` satisfies it); :func:`check_parameters`
applies a command's specs to the parameters of a signed command and
:func:`spec_problems` checks a spec itself (for the profile loader).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

ParameterValue = bool | int | float | str

MAX_EXACT_FLOAT_INT: Final = 1 << 53  # larger integers do not convert to a float exactly
PARAMETER_TYPES: Final = ("int", "float", "bool", "enum")


class ParameterSpecLike(Protocol):
    """One parameter of a command (read-only view of the profile's ``ParameterSpec``)."""

    @property
    def type(self) -> str: ...

    @property
    def min(self) -> float | None: ...

    @property
    def max(self) -> float | None: ...

    @property
    def choices(self) -> Sequence[str] | None: ...

    @property
    def default(self) -> ParameterValue | None: ...


class ParameterProblem(ValueError):
    """The parameters of a command do not fit its schema."""


def value_problem(spec: ParameterSpecLike, value: object) -> str | None:
    """Why ``value`` does not fit ``spec``, or None when it does.

    ``int`` takes an integer only (never a float or a bool); ``float`` takes a finite
    float or an integer up to 2**53 (encoders in languages without an int/float
    distinction send 20 for 20.0); ``bool`` a bool; ``enum`` one of the choices.
    Values are never echoed: the message is safe to log and send back.
    """
    kind = type(value).__name__
    if spec.type == "bool":
        return None if isinstance(value, bool) else f"expected a bool, got {kind}"
    if spec.type == "enum":
        if not isinstance(value, str):
            return f"expected text, got {kind}"
        return None if value in (spec.choices or ()) else f"not one of {list(spec.choices or ())}"
    if spec.type not in ("int", "float"):
        return f"unsupported parameter type {spec.type!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected {'an integer' if spec.type == 'int' else 'a number'}, got {kind}"
    if spec.type == "int" and not isinstance(value, int):
        return f"expected an integer, got {kind}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be finite"
    if spec.type == "float" and isinstance(value, int) and abs(value) > MAX_EXACT_FLOAT_INT:
        return "integer too large to be a float exactly"
    if spec.min is not None and value < spec.min:
        return f"below the minimum {spec.min}"
    if spec.max is not None and value > spec.max:
        return f"above the maximum {spec.max}"
    return None


def spec_problems(spec: ParameterSpecLike) -> list[str]:
    """What is wrong with a spec itself (for the profile loader); empty when it is usable."""
    problems: list[str] = []
    if spec.type not in PARAMETER_TYPES:
        return [f"type must be one of {list(PARAMETER_TYPES)}"]
    numeric = spec.type in ("int", "float")
    for bound, value in (("min", spec.min), ("max", spec.max)):
        if value is None:
            continue
        if not numeric:
            problems.append(f"{bound} applies to int and float parameters, not {spec.type}")
        elif not math.isfinite(value):
            problems.append(f"{bound} must be finite")
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        problems.append(f"min {spec.min} is above max {spec.max}")
    if spec.type == "enum":
        if not spec.choices:
            problems.append("an enum parameter needs choices")
        elif len(set(spec.choices)) != len(spec.choices):
            problems.append("choices must be unique")
    elif spec.choices:
        problems.append(f"choices apply to enums, not {spec.type}")
    if spec.default is not None and not problems:
        problem = value_problem(spec, spec.default)
        if problem is not None:
            problems.append(f"default {spec.default!r}: {problem}")
    return problems


def _normalised(spec: ParameterSpecLike, value: ParameterValue) -> ParameterValue:
    if spec.type == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_parameters(specs: Mapping[str, ParameterSpecLike],
                     params: Mapping[str, ParameterValue]) -> dict[str, ParameterValue]:
    """Return the parameters with defaults filled in, or raise :class:`ParameterProblem`.

    Unknown parameters, missing required ones, values outside their spec and a default
    that does not fit its own spec are all errors; the message names every problem.
    Float parameters come back as floats even when sent as integers.
    """
    problems: list[str] = []
    unknown = sorted(set(params) - set(specs))
    if unknown:
        problems.append(f"unknown parameters {unknown[:8]}")
    out: dict[str, ParameterValue] = {}
    for name, spec in specs.items():
        value = params.get(name, spec.default)
        if value is None:
            problems.append(f"{name}: required")
            continue
        problem = value_problem(spec, value)
        if problem is not None:
            problems.append(f"{name}{'' if name in params else ' (default)'}: {problem}")
        else:
            out[name] = _normalised(spec, value)
    if problems:
        raise ParameterProblem("; ".join(problems))
    return out
