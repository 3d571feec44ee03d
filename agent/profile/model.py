"""Vehicle profile schema (pydantic v2, unknown keys forbidden).

The shape and value ranges live here; cross-references (signals to DBC messages,
rules to signals, expressions) are checked by :mod:`agent.profile.semantics`.
Later sections (commands, OTA, diagnostics) are added as new optional keys, with
``schema_version`` raised when a profile needs a newer agent.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$", max_length=64)]
SignalName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$", max_length=200),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VehicleInfo(_Strict):
    family: Identifier
    description: str = ""
    firmware_versions: list[str] = Field(
        min_length=1,
        description="Firmware versions this profile applies to, as shell-style patterns (2.1.*)",
    )


class BusSpec(_Strict):
    name: Identifier
    interface: str = Field(default="socketcan", description="python-can interface name")
    channel: str = Field(description="python-can channel, e.g. can0, vcan0, /dev/ttyACM0")
    bitrate: int = Field(default=500_000, gt=0, le=1_000_000)
    fd: bool = False
    data_bitrate: int | None = Field(default=None, gt=0, le=12_000_000)
    databases: list[str] = Field(
        min_length=1, description="DBC/KCD/SYM/ARXML files, relative to the profile file"
    )


class SignalSpec(_Strict):
    name: SignalName = Field(description="Canonical name, a COVESA VSS path where one exists")
    bus: Identifier | None = Field(default=None, description="Needed when the message name is on several buses")
    message: str
    signal: str
    unit: str | None = Field(default=None, description="Must agree with the database's unit")
    out_of_range: Literal["drop", "clamp", "keep"] = Field(
        default="drop", description="What to do with a value outside the database's min..max"
    )
    description: str = ""


class PeriodicRule(_Strict):
    type: Literal["periodic"]
    name: Identifier
    period_ms: int = Field(gt=0, le=86_400_000)
    signals: list[SignalName] = Field(min_length=1)


class OnChangeRule(_Strict):
    type: Literal["on_change"]
    name: Identifier
    signals: list[SignalName] = Field(min_length=1)
    deadband: float = Field(default=0.0, ge=0)
    min_interval_ms: int = Field(default=0, ge=0)


class CaptureSpec(_Strict):
    signals: list[SignalName] = Field(min_length=1)
    pre_ms: int = Field(default=0, ge=0, le=600_000)
    post_ms: int = Field(default=0, ge=0, le=600_000)
    sample_ms: int = Field(default=100, gt=0, le=60_000)


class TriggerRule(_Strict):
    type: Literal["trigger"]
    name: Identifier
    condition: str = Field(min_length=1, max_length=2000)
    mode: Literal["rising_edge", "always"] = "rising_edge"
    min_interval_ms: int = Field(default=0, ge=0)
    capture: CaptureSpec


AggregateFunction = Literal["min", "max", "mean", "count", "last"]


class AggregateRule(_Strict):
    type: Literal["aggregate"]
    name: Identifier
    window_ms: int = Field(gt=0, le=86_400_000)
    signals: list[SignalName] = Field(min_length=1)
    functions: list[AggregateFunction] = Field(min_length=1)


Rule = Annotated[
    PeriodicRule | OnChangeRule | TriggerRule | AggregateRule, Field(discriminator="type")
]


ParameterValue = int | float | bool | str


class ParameterSpec(_Strict):
    """One parameter of a remote command; anything outside it is rejected."""

    type: Literal["int", "float", "bool", "enum"]
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = Field(default=None, description="allowed values of an enum")
    default: ParameterValue | None = Field(default=None, description="makes the parameter optional")


class AllowedMessage(_Strict):
    """A message the agent may transmit. Nothing else is ever sent on a bus."""

    bus: Identifier
    message: str


class CanAction(_Strict):
    """Encode a database message from constants and parameters and send it."""

    type: Literal["can"]
    bus: Identifier
    message: str
    signals: dict[str, ParameterValue] = Field(
        description="signal -> constant, or '$name' for the command parameter 'name'; "
                    "signals not listed take their database initial value")
    repeat: int = Field(default=1, ge=1, le=50)
    interval_ms: int = Field(default=0, ge=0, le=10_000)


class SnapshotAction(_Strict):
    """Report the current value of signals now (all catalog signals when none are named)."""

    type: Literal["snapshot"]
    signals: list[SignalName] = Field(default_factory=list)


class SetRuleAction(_Strict):
    """Change a collection rule's parameters, within bounds the profile allows."""

    type: Literal["set_rule"]
    rule: Identifier
    parameters: dict[str, ParameterSpec] = Field(
        description="rule field (e.g. period_ms) -> the range a command may set it to")


class StatusAction(_Strict):
    """Report the agent's status (buses, outbox, rules)."""

    type: Literal["status"]


CommandAction = Annotated[CanAction | SnapshotAction | SetRuleAction | StatusAction,
                          Field(discriminator="type")]


class Precondition(_Strict):
    condition: str = Field(min_length=1, max_length=2000, description="expression over signals")
    max_age_ms: int = Field(default=1000, gt=0, le=600_000,
                            description="every signal it reads must be at most this old")


class Confirmation(_Strict):
    """Wait for a feedback signal to reach a value; report succeeded or failed with what was seen."""

    signal: SignalName
    equals: ParameterValue = Field(description="expected value, or '$name' for a parameter")
    timeout_ms: int = Field(gt=0, le=600_000)


class RateLimit(_Strict):
    max_commands: int = Field(gt=0)
    per_s: float = Field(gt=0)


class CommandSpec(_Strict):
    name: Identifier
    description: str = ""
    parameters: dict[Identifier, ParameterSpec] = Field(default_factory=dict)
    preconditions: list[Precondition] = Field(default_factory=list)
    action: CommandAction
    confirm: Confirmation | None = None
    rate_limit: RateLimit | None = None


class VehicleProfile(_Strict):
    schema_version: Literal[1] = Field(description="Version of this profile schema")
    vehicle: VehicleInfo
    buses: list[BusSpec] = Field(min_length=1)
    signals: list[SignalSpec] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list)
    actuation_allow: list[AllowedMessage] = Field(
        default_factory=list, description="the only messages remote commands may send")
    commands: list[CommandSpec] = Field(default_factory=list)
