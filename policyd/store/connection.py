"""Opening the database: the pragmas every connection needs, and the schema on first use."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from policyd.store.schema import migrate

JOURNAL_SIZE_LIMIT = 64 << 20  # bytes of WAL file kept after it starts over


class StoreError(RuntimeError):
    """The database failed or is closed."""


def connect(path: str | Path, *, synchronous: str = "NORMAL", busy_timeout: float = 5.0,
            readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the pragmas every connection needs."""
    # cached_statements: the hot path's batch statements vary with the batch size
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout, cached_statements=512)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    else:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def connect_writer(path: str | Path, **options: Any) -> sqlite3.Connection:
    """The one write connection: it never checkpoints by itself and never waits for a lock
    unless told to (the event loop uses it too)."""
    conn = connect(path, **options)
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints, never the loop
    # a WAL that did grow (a long reader, a burst) is cut back when it starts over
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute("PRAGMA busy_timeout=0")  # the loop never waits; the thread sets its own
    return conn


def open_and_migrate(path: str | Path, **options: Any) -> None:
    """Create the database file if needed and bring its schema up to date."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, **options)
    try:
        migrate(conn)
    finally:
        conn.close()
