"""The agent's own, machine-specific configuration (not the vehicle profile).

Device identity, file paths, where output goes, and per-machine bus overrides (the
profile says ``can0``; a test bench may say ``vcan0``). Same located-error loading as
profiles: file, line, key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.commands.settings import CommandSettings
from agent.errors import ConfigError
from agent.profile.loader import validate_model
from agent.profile.yamlsrc import load_yaml_file
from agent.uplink.service import UplinkSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BusOverride(_Strict):
    interface: str | None = None
    channel: str | None = None
    bitrate: int | None = Field(default=None, gt=0)
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra python-can arguments of the interface, "
        "e.g. tty_baudrate for slcan or speed for sim-replay")


class CanSettings(_Strict):
    receive_buffer_bytes: int = Field(default=4 * 1024 * 1024, ge=65536,
                                      description="SO_RCVBUF for SocketCAN sockets")
    reopen_initial_s: float = Field(default=0.5, gt=0)
    reopen_max_s: float = Field(default=30.0, gt=0)


class ClockSettings(_Strict):
    synced: Literal["auto", "assume_synced", "assume_unsynced"] = Field(
        default="auto", description="auto asks the kernel (adjtimex) whether NTP/PTP/GPS disciplines the clock")
    step_threshold_ms: int = Field(default=1000, gt=0)


class JsonLinesOutput(_Strict):
    type: Literal["jsonl"]
    path: str = Field(default="-", description="file path, or - for stdout")


Output = Annotated[JsonLinesOutput, Field(discriminator="type")]


class LogSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class AgentConfig(_Strict):
    vehicle_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
    profile: str = Field(description="vehicle profile path, relative to this file")
    firmware_version: str | None = Field(default=None, description="checked against the profile")
    buses: dict[str, BusOverride] = Field(default_factory=dict)
    can: CanSettings = CanSettings()
    clock: ClockSettings = ClockSettings()
    output: Output | None = Field(default=None, description="local JSON-lines copy of the records; "
                                  "without uplink and output, records go to stdout")
    uplink: UplinkSettings | None = None
    commands: CommandSettings | None = Field(default=None, description="remote commands; needs uplink")
    log: LogSettings = LogSettings()


def load_agent_config(path: str | Path) -> tuple[AgentConfig, Path]:
    """Return the config, with file paths resolved against its directory, and the profile path."""
    path = Path(path)
    data, source = load_yaml_file(path)
    config: AgentConfig = validate_model(AgentConfig, data, source)
    base = path.parent
    profile = (base / config.profile).resolve()
    if not profile.is_file():
        raise ConfigError([source.problem(("profile",), f"profile not found: {profile}")])
    if config.uplink is not None:
        mqtt, outbox = config.uplink.mqtt, config.uplink.outbox
        for key in ("ca_file", "cert_file", "key_file"):
            file = base / getattr(mqtt, key)
            if not file.is_file():
                raise ConfigError([source.problem(("uplink", "mqtt", key), f"file not found: {file}")])
        uplink = config.uplink.model_copy(update={
            "mqtt": mqtt.model_copy(update={k: (base / getattr(mqtt, k)).resolve()
                                            for k in ("ca_file", "cert_file", "key_file")}),
            "outbox": outbox.model_copy(update={"path": (base / outbox.path).resolve()}),
        })
        config = config.model_copy(update={"uplink": uplink})
    if config.commands is not None:
        if config.uplink is None:
            raise ConfigError([source.problem(("commands",), "remote commands arrive over the uplink: "
                                              "configure uplink too")])
        keys = base / config.commands.trusted_keys
        if not keys.is_file():
            raise ConfigError([source.problem(("commands", "trusted_keys"), f"file not found: {keys}")])
        commands = config.commands.model_copy(update={
            "trusted_keys": keys.resolve(),
            "replay": config.commands.replay.model_copy(
                update={"path": (base / config.commands.replay.path).resolve()}),
        })
        config = config.model_copy(update={"commands": commands})
    return config, profile
