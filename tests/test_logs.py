"""The per-key log limiter behind "logged at most once per id per minute"."""

from __future__ import annotations

from agent.logs import LogLimiter


def test_one_line_per_key_per_interval_and_counts_what_it_held_back() -> None:
    now = [0.0]
    limiter = LogLimiter(60.0, clock=lambda: now[0])
    assert limiter.allow(("bus", 0x100))
    assert not limiter.allow(("bus", 0x100))
    assert limiter.allow(("bus", 0x200))  # another id is not held back
    now[0] = 59.9
    assert not limiter.allow(("bus", 0x100))
    now[0] = 60.0
    assert limiter.allow(("bus", 0x100))
    assert limiter.take_suppressed(("bus", 0x100)) == 2
    assert limiter.take_suppressed(("bus", 0x100)) == 0
