"""One error hierarchy, split by what the caller can do about it.

* :class:`ConfigError` -- a person must fix a file; the daemon exits with 78 (EX_CONFIG).
* :class:`RejectedInput` -- something from outside (a frame, a command, a bundle) is bad;
  reject it with a reason, count it, keep running.
* :class:`TransientError` -- the world is temporarily unavailable (a bus, a broker);
  retry with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass

EX_CONFIG = 78


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a configuration file, located for a person to fix."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.path}" if self.path else ""
        return f"{where}{key}: {self.message}"


class ConfigError(AgentError):
    """A configuration, profile or DBC file is wrong; carries every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    @classmethod
    def single(cls, file: str, message: str, line: int | None = None, path: str = "") -> ConfigError:
        return cls([ConfigProblem(file, line, path, message)])


class RejectedInput(AgentError):
    """Input from outside the agent that is rejected; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class FrameRejected(RejectedInput):
    """A CAN frame that cannot be decoded as the profile describes it."""


class TransientError(AgentError):
    """Temporary failure of something outside the agent; the caller retries."""


class BusUnavailable(TransientError):
    """A CAN bus cannot be opened or has gone away."""
