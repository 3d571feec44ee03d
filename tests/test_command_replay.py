"""Replay state on real SQLite files: persistence, counters, redelivery, crash window, audit, kill -9."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands import results
from agent.commands.envelope import CommandRejected, CommandVerifier, VerifiedCommand, sign_command
from agent.commands.keys import Keyring, TrustedKey
from agent.commands.replay import (
    FINAL_STATES,
    INTERRUPTED,
    MAX_RESULT_BYTES,
    ReplayBusy,
    ReplaySettings,
    ReplayStore,
)
from agent.profile.model import ParameterSpec

NOW = 1_750_000_000_000
VEHICLE = "VIN-0001"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
REPO = Path(__file__).resolve().parents[1]
SCHEMAS = {"flash_lights": {"count": ParameterSpec(type="int", min=1, max=10, default=3)}, "lock_doors": {}}


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def command(n: int, issuer: str = "fleet", *, counter: int | None = None, expires: int = NOW + 60_000,
            name: str = "lock_doors") -> VerifiedCommand:
    return VerifiedCommand(command_id=f"cmd-{n}", vehicle_id=VEHICLE, issuer=issuer, kid="fleet-1", name=name,
                           params={}, issued_at_ms=NOW, expires_at_ms=expires,
                           counter=n if counter is None else counter, digest="00" * 32)


def stored_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM commands")}
    finally:
        conn.close()


def store_at(path: Path, clock: Clock | None = None, **settings: Any) -> ReplayStore:
    return ReplayStore(ReplaySettings(path=path, **settings), clock_ms=clock or Clock())


def signed(n: int, *, issued: int = NOW, name: str = "flash_lights", params: dict[str, Any] | None = None) -> bytes:
    return sign_command(command_id=f"cmd-{n}", vehicle_id=VEHICLE, name=name, params=params or {},
                        issued_at_ms=issued, expires_at_ms=issued + 60_000, counter=n, private_key=KEY,
                        kid="fleet-1")


def verifier(clock: Clock) -> CommandVerifier:
    return CommandVerifier(VEHICLE, Keyring([TrustedKey("fleet-1", "fleet", KEY.public_key())]), SCHEMAS,
                           clock_ms=clock)


def test_state_persists_across_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "commands.sqlite"
    with store_at(db) as store:
        store.accept(command(1))
        store.record_result("cmd-1", "succeeded", {"doors": "locked"})
        store.accept(command(5, "ops"))
        store.record_result("cmd-5", "failed", {"reason": "precondition_failed", "detail": "speed 12 km/h"})
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    with store_at(db) as store:
        assert store.counters() == {"fleet": 1, "ops": 5}
        view = store.view()
        assert view.seen("cmd-1") and view.seen("cmd-5") and not view.seen("cmd-2")
        assert view.counter_for("fleet") == 1 and view.counter_for("nobody") is None
        assert view.reset_at_ms() is None
        stored = store.result("cmd-1")
        assert stored is not None and stored.state == "succeeded" and stored.result == {"doors": "locked"}
        assert stored.finished and stored.accepted_ms == NOW and stored.counter == 1
        failed = store.result("cmd-5")
        assert failed is not None and failed.state == "failed" and failed.result is not None
        assert failed.result["reason"] == "precondition_failed"
        assert store.result("cmd-404") is None
        assert store.interrupted == () and store.recovery is None


def test_counter_is_monotonic_per_issuer_and_checked_atomically(tmp_path: Path) -> None:
    with store_at(tmp_path / "c.sqlite") as store:
        store.accept(command(5))
        for stale in (command(6, counter=5), command(7, counter=3)):
            with pytest.raises(CommandRejected) as info:
                store.accept(stale)
            assert info.value.reason == "replayed_counter" and info.value.command_id == stale.command_id
        with pytest.raises(CommandRejected) as info:
            store.accept(command(5, counter=9))  # same id, higher counter
        assert info.value.reason == "replayed_id"
        store.accept(command(8, "other", counter=1))  # another issuer has its own counter
        store.accept(command(9))
        assert store.counters() == {"fleet": 9, "other": 1}
        # a rejected accept changed nothing
        assert store.result("cmd-6") is None and store.result("cmd-7") is None


def test_verify_accept_record_and_redelivery_returns_the_stored_result(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "c.sqlite"
    v = verifier(clock)
    with store_at(db, clock) as store:
        cmd = v.verify(signed(1, params={"count": 4}), store.view())
        store.accept(cmd)
        store.record_result(cmd.command_id, "succeeded", {"flashed": 4})
        with pytest.raises(CommandRejected) as info:
            v.verify(signed(1, params={"count": 4}), store.view())
        assert info.value.reason == "replayed_id"
        assert info.value.command_id is not None
        stored = store.result(info.value.command_id)
        assert stored is not None and stored.result == {"flashed": 4}
    clock.now += 3_600_000  # after a restart and long after expiry: still recognised, still answered
    with store_at(db, clock) as store:
        with pytest.raises(CommandRejected) as info:
            v.verify(signed(1, params={"count": 4}), store.view())
        assert info.value.reason == "replayed_id"
        assert store.result("cmd-1") is not None
        # an old counter with a fresh id is still a replay
        with pytest.raises(CommandRejected) as info:
            v.verify(sign_command(command_id="fresh", vehicle_id=VEHICLE, name="lock_doors", params={},
                                  issued_at_ms=clock.now, expires_at_ms=clock.now + 1000, counter=1,
                                  private_key=KEY, kid="fleet-1"), store.view())
        assert info.value.reason == "replayed_counter"


def test_two_deliveries_racing_past_verify_are_accepted_once(tmp_path: Path) -> None:
    clock = Clock()
    with store_at(tmp_path / "c.sqlite", clock) as store:
        v = verifier(clock)
        first = v.verify(signed(1), store.view())
        second = v.verify(signed(1), store.view())  # verified against the same, stale, view
        store.accept(first)
        with pytest.raises(CommandRejected) as info:
            store.accept(second)
        assert info.value.reason == "replayed_id"


def test_accepted_but_unfinished_command_is_interrupted_after_restart(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "c.sqlite"
    with store_at(db, clock) as store:
        store.accept(command(1))
        store.record_result("cmd-1", "succeeded", {})
        store.accept(command(2))  # the process dies while this one runs
    clock.now += 5000
    with store_at(db, clock) as store:
        assert [c.command_id for c in store.interrupted] == ["cmd-2"]
        stored = store.result("cmd-2")
        assert stored is not None and stored.state == INTERRUPTED and stored.finished_ms == NOW + 5000
        assert stored.result is not None and stored.result["reason"] == "interrupted"
        with pytest.raises(ValueError, match="already has outcome interrupted"):
            store.record_result("cmd-2", "succeeded", {})
        assert store.view().seen("cmd-2")  # never run again
        audit = store.recent_audit(1)[0]
        assert (audit.command_id, audit.decision) == ("cmd-2", "interrupted")
    with store_at(db, clock) as store:
        assert store.interrupted == ()  # reported once


CHILD_ACCEPT_THEN_HANG = textwrap.dedent("""
    import sys, time
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from agent.commands.envelope import VerifiedCommand
    from agent.commands.replay import ReplayStore
    store = ReplayStore(sys.argv[1])
    store.accept(VerifiedCommand("cmd-killed", "VIN-0001", "fleet", "fleet-1", "lock_doors", {}, 1, 2, 3, "00"))
    print("ACCEPTED", flush=True)
    time.sleep(60)
""")


def test_kill_9_after_accept_leaves_an_interrupted_command(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD_ACCEPT_THEN_HANG)
    child = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ACCEPTED"
    with pytest.raises(ReplayBusy):  # the live child holds the store
        ReplayStore(db)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with ReplayStore(db) as store:
        assert [c.command_id for c in store.interrupted] == ["cmd-killed"]
        assert store.counters() == {"fleet": 3}


def test_record_result_validation(tmp_path: Path) -> None:
    with store_at(tmp_path / "c.sqlite") as store:
        store.accept(command(1))
        with pytest.raises(ValueError, match="state must be one of"):
            store.record_result("cmd-1", "accepted", {})
        with pytest.raises(KeyError):
            store.record_result("cmd-404", "succeeded", {})
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            store.record_result("cmd-1", "succeeded", {"x": object()})
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            store.record_result("cmd-1", "succeeded", {"x": float("nan")})
        with pytest.raises(ValueError, match="limit"):
            store.record_result("cmd-1", "succeeded", {"x": "y" * MAX_RESULT_BYTES})
        stored = store.result("cmd-1")
        assert stored is not None and stored.state == "accepted"  # nothing was written by the failures
        store.record_result("cmd-1", "succeeded", {"ok": True})
        with pytest.raises(ValueError, match="already has outcome succeeded"):
            store.record_result("cmd-1", "failed", {})
        # every final state of the executor can be stored
        for n, state in enumerate(FINAL_STATES, start=2):
            store.accept(command(n))
            store.record_result(f"cmd-{n}", state, {"reason": f"r-{state}"})
            stored = store.result(f"cmd-{n}")
            assert stored is not None and stored.state == state
            assert store.recent_audit(1)[0].reason == f"r-{state}"
        assert set(results.FINAL_STATES) <= set(FINAL_STATES)  # the wire's final states all fit


def test_ids_are_bounded_but_counters_keep_guarding(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "c.sqlite"
    with store_at(db, clock, max_ids=100) as store:
        for n in range(1, 151):
            store.accept(command(n))
            if n != 3:  # cmd-3 never finishes: an open command is never pruned
                store.record_result(f"cmd-{n}", "succeeded", {"n": n})
        ids = stored_ids(db)
        assert len(ids) == 100 and "cmd-3" in ids and "cmd-150" in ids and "cmd-4" not in ids
        assert store.result("cmd-1") is None
        # the id is forgotten, the counter is not
        with pytest.raises(CommandRejected) as info:
            verifier(clock).verify(signed(1), store.view())
        assert info.value.reason == "replayed_counter"


def test_finished_ids_expire_after_the_retention_time(tmp_path: Path) -> None:
    clock = Clock()
    with store_at(tmp_path / "c.sqlite", clock, id_retention_ms=1000) as store:
        store.accept(command(1, expires=NOW + 10))
        store.record_result("cmd-1", "succeeded", {})
        store.accept(command(2, expires=NOW + 10))  # still open
        clock.now = NOW + 10 + 1000
        store.accept(command(3))
        assert store.result("cmd-1") is not None  # exactly at the edge: kept
        clock.now += 1
        store.accept(command(4))
        assert store.result("cmd-1") is None
        assert store.result("cmd-2") is not None  # open commands are never pruned


def test_audit_log_is_bounded_and_newest_first(tmp_path: Path) -> None:
    clock = Clock()
    with store_at(tmp_path / "c.sqlite", clock, max_audit_rows=100) as store:
        store.accept(command(1))
        store.record_result("cmd-1", "failed", {"reason": "precondition_failed"})
        v = verifier(clock)
        with pytest.raises(CommandRejected) as info:
            v.verify(signed(1), store.view())
        store.audit_rejection(info.value)
        with pytest.raises(CommandRejected) as info:
            v.verify(b"garbage", store.view())
        store.audit_rejection(info.value)
        rows = store.recent_audit(10)
        assert [(r.decision, r.reason, r.command_id) for r in rows] == [
            ("rejected", "malformed", None), ("rejected", "replayed_id", "cmd-1"),
            ("failed", "precondition_failed", "cmd-1"), ("accepted", "", "cmd-1")]
        assert rows[1].issuer == "fleet" and rows[1].name == "flash_lights"
        for i in range(250):
            clock.now += 1
            store.audit("rejected", reason="too_large", detail=f"n={i} " + "x" * 2000)
        rows = store.recent_audit(1000)
        assert len(rows) == 100
        assert rows[0].detail.startswith("n=249 ") and rows[-1].detail.startswith("n=150 ")
        assert all(len(r.detail) == 512 for r in rows)
        assert rows[0].ts_ms == NOW + 250


def test_one_process_owns_the_store(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    with store_at(db), pytest.raises(ReplayBusy):
        store_at(db)
    with store_at(db) as store:
        store.close()
        with pytest.raises(RuntimeError):
            store.accept(command(1))


def test_corrupt_database_is_moved_aside_and_old_commands_are_not_trusted(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "c.sqlite"
    db.write_bytes(b"this is not a database" * 500)
    clock.now = NOW + 1000
    with store_at(db, clock) as store:
        assert store.recovery is not None and store.recovery.moved_to is not None
        assert store.recovery.moved_to.read_bytes().startswith(b"this is not")
        assert store.reset_at_ms == NOW + 1000
        v = verifier(clock)
        with pytest.raises(CommandRejected) as info:
            v.verify(signed(1, issued=NOW), store.view())  # issued before the loss: cannot be judged
        assert info.value.reason == "replay_state_reset"
        store.accept(v.verify(signed(2, issued=NOW + 1000), store.view()))
        assert store.recent_audit(2)[-1].reason == "replay_state_lost"
    with store_at(db, clock) as store:  # the reset time is durable
        assert store.recovery is None and store.reset_at_ms == NOW + 1000


def test_deleted_database_is_a_loss_of_state_not_a_fresh_start(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "c.sqlite"
    with store_at(db, clock) as store:
        store.accept(command(5))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    clock.now = NOW + 1000
    with store_at(db, clock) as store:
        assert store.recovery is not None and store.recovery.moved_to is None
        assert "missing" in store.recovery.problem and store.reset_at_ms == NOW + 1000
        with pytest.raises(CommandRejected) as info:  # cmd-5 could be replayed otherwise
            verifier(clock).verify(signed(5, issued=NOW), store.view())
        assert info.value.reason == "replay_state_reset"
    # removing the lock file too is the operator's explicit clean start
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with store_at(db, clock) as store:
        assert store.recovery is None and store.reset_at_ms is None


def test_unusable_database_keeps_the_counters_it_still_has(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    with store_at(db) as store:
        store.accept(command(41))
        store.accept(command(7, "ops"))
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")  # not a schema we know
    conn.commit()
    conn.close()
    with store_at(db) as store:
        assert store.recovery is not None and store.recovery.counters_salvaged == 2
        assert "unsupported replay schema 99" in store.recovery.problem
        assert store.counters() == {"fleet": 41, "ops": 7}
        with pytest.raises(CommandRejected):
            store.accept(command(40, counter=41))


CHILD_LOOP = textwrap.dedent(r"""
    import os, sys
    import structlog
    from agent.commands.envelope import VerifiedCommand
    from agent.commands.replay import ReplaySettings, ReplayStore

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))

    def say(*words):  # one write(2) of a short line to a pipe is atomic
        os.write(1, (" ".join(map(str, words)) + "\n").encode())

    store = ReplayStore(ReplaySettings(path=sys.argv[1], max_ids=1_000_000, max_audit_rows=500))
    n = store.counters().get("fleet", 0)
    say("READY", "-", n)
    while True:
        n += 1
        cid = f"cmd-{n}"
        say("a", cid, n)
        store.accept(VerifiedCommand(cid, "VIN-0001", "fleet", "fleet-1", "lock_doors", {}, 1, 2**52, n, "00"))
        say("A", cid, n)
        if n % 3:
            store.record_result(cid, "succeeded", {"n": n})
            say("R", cid, n)
        else:
            store.audit("rejected", reason="too_large", detail="filler")
""")


def test_kill_9_during_accept_and_record_loops_leaves_a_consistent_database(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD_LOOP)
    rnd = random.Random(20250615)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    accepted: dict[str, int] = {}  # reported by the child after accept() returned
    recorded: set[str] = set()
    total_ids = 0
    for round_no in range(15):
        child = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=env)
        assert child.stdout is not None
        lines: list[str] = []
        if round_no % 5 == 4:  # sometimes during start-up (open, interrupted marking)
            time.sleep(rnd.uniform(0.0, 0.3))
        else:
            ready = child.stdout.readline().split()
            assert ready[0] == "READY"
            lines += [child.stdout.readline() for _ in range(rnd.randint(1, 60))]
            time.sleep(rnd.uniform(0.0, 0.02))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        lines += [line + "\n" for line in out.split("\n")[:-1]]
        for line in lines:
            assert line.endswith("\n"), f"torn line {line!r}"
            kind, cid, n = line.split()
            if kind == "A":
                accepted[cid] = int(n)
            elif kind == "R":
                recorded.add(cid)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = {r[0]: r[1:] for r in conn.execute("SELECT id, counter, state, result FROM commands")}
        counter = conn.execute("SELECT counter FROM counters WHERE issuer = 'fleet'").fetchone()
        conn.close()
        missing = set(accepted) - set(rows)
        assert not missing, f"round {round_no}: accepted commands lost: {sorted(missing)[:5]}"
        for cid in recorded:
            assert rows[cid][1] == "succeeded" and rows[cid][2] is not None, cid
        for cid, (n, state, result) in rows.items():
            assert state in ("accepted", "succeeded", "interrupted"), (cid, state)
            assert (result is None) == (state == "accepted"), (cid, state, result)
            assert cid == f"cmd-{n}"
        if rows:
            assert counter is not None and counter[0] == max(n for n, _, _ in rows.values())
        total_ids = len(rows)
    assert len(accepted) > 20
    with ReplayStore(ReplaySettings(path=db, max_ids=1_000_000)) as store:
        assert store.recovery is None
        for cid in accepted:
            stored = store.result(cid)
            assert stored is not None and stored.state in ("succeeded", "interrupted"), (cid, stored)
            if cid in recorded:
                assert stored.state == "succeeded"
            if accepted[cid] % 3 == 0:  # never given a result: interrupted by the next start
                assert stored.state == "interrupted"
        # no counter was accepted twice, none skipped
        assert sorted(int(cid.split("-")[1]) for cid in stored_ids(db)) == list(range(1, total_ids + 1))
