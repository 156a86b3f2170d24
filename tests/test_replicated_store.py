"""The store's side of replication (SPEC §10): checkpoints never fight Litestream (PASSIVE
only), Litestream's own tables are left alone, and the master token does not live only beside
the database without `serve` saying so.

Litestream keeps a read transaction open on the database at all times (it is how it stops
anyone from restarting the WAL before it has copied the frames). A PASSIVE checkpoint copies
what it can and returns; FULL, RESTART and TRUNCATE wait for that reader to move on, holding
the write lock meanwhile, so every write would stall behind them. The test below holds such a
reader while the store commits enough to checkpoint twice, with a busy timeout longer than the
test's deadline: under any other checkpoint mode the writes never finish.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Callable

import pytest

from policyd.config import Config
from policyd.main import master_token
from policyd.store import Store, connect, open_and_migrate
from policyd.store import counters
from policyd.store import domains as domain_store
from policyd.store.schema import migrate, objects
from policyd.store.scope import MASTER

DOMAIN = "replicated.example"
DAY, MONTH = "2026-11-24", "2026-11"
CHECKPOINT_EVERY = 100  # commits between checkpoints (the real default is 1,000)
WRITES = 2 * CHECKPOINT_EVERY + 50  # two checkpoints and then some
DEADLINE = 120.0  # seconds; PASSIVE takes a second or two, anything else waits BUSY_TIMEOUT
BUSY_TIMEOUT = 600.0
# What Litestream 0.5 creates in every database it replicates (db.go, DB.init).
LITESTREAM_TABLES = ("CREATE TABLE IF NOT EXISTS _litestream_seq "
                     "(id INTEGER PRIMARY KEY, seq INTEGER);"
                     "CREATE TABLE IF NOT EXISTS _litestream_lock (id INTEGER);")


def _create(conn: sqlite3.Connection) -> int:
    return domain_store.create_domain(conn, MASTER, DOMAIN, None, "unlimited", (None, None)).id


def _sent_today(conn: sqlite3.Connection, domain_id: int) -> int:
    return counters.totals(conn, domain_id, DAY, MONTH).sent_today


async def test_checkpoints_never_wait_for_a_reader_holding_a_snapshot(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3", busy_timeout=BUSY_TIMEOUT,
                  checkpoint_every=CHECKPOINT_EVERY)
    await store.open()
    reader: sqlite3.Connection | None = None
    try:
        domain_id = await store.write(_create)
        for _ in range(10):
            await store.write(counters.add, domain_id, DAY, MONTH, 1, 100)
        reader = connect(store.path, readonly=True)  # Litestream's long read transaction
        reader.execute("BEGIN")
        assert _sent_today(reader, domain_id) == 10
        wal = Path(f"{store.path}-wal")
        smallest_wal = wal.stat().st_size

        async def increments() -> None:
            nonlocal smallest_wal
            for _ in range(WRITES):
                await store.write(counters.add, domain_id, DAY, MONTH, 1, 100)
                smallest_wal = min(smallest_wal, wal.stat().st_size)

        try:
            await asyncio.wait_for(increments(), DEADLINE)
        finally:
            # Under FULL/RESTART/TRUNCATE the checkpoint is still waiting for this reader:
            # let it go, or closing the store would wait out BUSY_TIMEOUT.
            still_at = _sent_today(reader, domain_id)
            reader.execute("COMMIT")
        assert store.checkpoints >= 2
        assert still_at == 10  # the reader's snapshot was never pulled from under it
        assert smallest_wal > 0  # and its WAL was never truncated meanwhile
        assert await store.read(_sent_today, domain_id) == 10 + WRITES
    finally:
        if reader is not None:
            reader.close()
        await store.close()


def test_litestream_tables_are_left_alone_and_never_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "db.sqlite3"
    open_and_migrate(path)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(LITESTREAM_TABLES + "INSERT INTO _litestream_seq VALUES (1, 7);")
        with caplog.at_level(logging.WARNING, logger="policyd.store.schema"):
            assert not migrate(conn)  # up to date: no migration on every start
            assert caplog.records == []
            conn.execute("CREATE TABLE stray (x)")  # not ours, not Litestream's: warned about
            migrate(conn)
        assert [r.getMessage() for r in caplog.records] == [
            "table stray is not in schema.sql; left in place"]
        assert not any(name.startswith("_litestream") for _, name in objects(conn))
        assert conn.execute("SELECT seq FROM _litestream_seq").fetchone() == (7,)
        assert conn.execute("SELECT count(*) FROM _litestream_lock").fetchone() == (0,)
    finally:
        conn.close()


def test_master_token_only_in_the_file_beside_the_database_is_warned_about(
        make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(auth={"master_token": ""})
    with caplog.at_level(logging.WARNING, logger="policyd.main"):
        first = master_token(config)  # generated into master.token
        caplog.clear()
        assert master_token(config) == first  # read back from it: said so
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert str(config.db_path.resolve().parent / "master.token") in message
    assert "[auth] master_token" in message and "POLICYD_MASTER_TOKEN" in message
    assert first not in message


def test_master_token_from_the_config_is_not_warned_about(
        make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(auth={"master_token": "configured-token-0123456789"})
    with caplog.at_level(logging.INFO, logger="policyd.main"):
        assert master_token(config) == "configured-token-0123456789"
    assert caplog.records == []
    assert not (config.db_path.resolve().parent / "master.token").exists()
