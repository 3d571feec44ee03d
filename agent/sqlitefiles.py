"""File handling shared by the agent's durable SQLite stores (outbox, command replay state).

Private files (0600), one process per database (flock on ``<db>.lock``), WAL mode with the
requested durability, an integrity check at open, and moving a database that cannot be used
aside (never deleting it).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

BUSY_TIMEOUT_S = 10.0
_FILES = ("", "-wal", "-shm")


class UnusableDatabase(Exception):
    """The database file at open is corrupt or not ours."""


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_file_lock(lock_path: Path) -> int | None:
    """An exclusive lock held for the life of the process; None when another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def connect_wal(path: Path, synchronous: str) -> sqlite3.Connection:
    """Open ``path`` (created 0600, with its WAL files kept 0600) in WAL mode, autocommit."""
    for suffix in _FILES:
        name = Path(f"{path}{suffix}")
        if suffix == "" and not name.exists():
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))
        if name.exists() and name.stat().st_mode & 0o077:
            os.chmod(name, 0o600)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise UnusableDatabase(f"cannot switch to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    except BaseException:
        conn.close()
        raise
    return conn


def quick_check(conn: sqlite3.Connection) -> set[str]:
    """Raise :class:`UnusableDatabase` unless SQLite's quick_check passes; return the table names."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        raise UnusableDatabase("quick_check: " + "; ".join(str(r[0]) for r in rows[:5]))
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def move_aside(path: Path) -> Path:
    """Rename the database and its WAL files to ``<db>.corrupt-<UTC time>-<pid>``; return it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}-{os.getpid()}")
    for suffix in _FILES:
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{target}{suffix}"))
    fsync_dir(path.parent)
    return target
