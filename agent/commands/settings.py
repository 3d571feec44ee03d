"""The ``commands:`` section of the agent configuration (kept free of heavy imports)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from agent.commands.envelope import VerifierSettings
from agent.commands.replay import ReplaySettings


class CommandSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trusted_keys: Path = Field(description="trusted command-signing keys (provisioning)")
    replay: ReplaySettings
    verifier: VerifierSettings = VerifierSettings()
    workers: int = Field(default=2, ge=1, le=16, description="commands on different buses run in parallel")
