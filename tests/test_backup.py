"""`policyd backup` (SPEC §10): a consistent copy while `serve` runs under policy load, and a
restore by copying it back while the daemon is stopped.

The daemon and the backup are real processes. Clients count the DUNNO replies they get (each
sent after its increment committed); the backup starts once BEFORE_BACKUP of them were
answered and the load goes on while it runs. The copy is one snapshot, so its counter holds
every DUNNO answered before the backup started and at most those answered by its end plus the
requests still in flight (one per client).
"""
from __future__ import annotations

import asyncio
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from policyd.store.backup import SIDE_FILES
from tests.conftest import outbound, request_bytes
from tests.daemon_process import (DaemonProcess, daemon_config, mark_ses_verified, run_cli,
                                  sent_today, serving)

DOMAIN = "backup.example"
CLIENTS = 4
BEFORE_BACKUP = 300  # DUNNO replies answered before the backup starts
LOAD_WAIT = 60.0  # bound on reaching a number of replies (never reached when all is well)


class Load:
    """Clients on persistent connections sending outbound END-OF-MESSAGE requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dunno = 0
        self.other: list[bytes] = []
        self.stopping = asyncio.Event()
        self._target = 0
        self._reached = asyncio.Event()
        self._clients: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._clients = [asyncio.create_task(self._client()) for _ in range(CLIENTS)]

    async def _client(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        request = request_bytes(**outbound(f"user@{DOMAIN}"))
        try:
            while not self.stopping.is_set():
                writer.write(request)
                reply = await reader.readuntil(b"\n\n")
                if reply != b"action=DUNNO\n\n":
                    self.other.append(reply)
                    return
                self.dunno += 1
                if self.dunno >= self._target:
                    self._reached.set()
        finally:
            writer.close()

    async def reach(self, count: int) -> None:
        """Wait until count DUNNO replies were answered in all."""
        self._target = count
        if self.dunno < count:
            self._reached.clear()
            await asyncio.wait_for(self._reached.wait(), LOAD_WAIT)

    async def stop(self) -> None:
        """Let every client take its last reply, then stop."""
        self.stopping.set()
        await asyncio.gather(*self._clients)


async def seed(daemon: DaemonProcess, db_path: Path) -> None:
    """The domain through the daemon's API, no limits; SES-verified through the store."""
    status, body = await daemon.api("POST", "/domains/", {"name": DOMAIN})
    assert status == 201, body
    status, body = await daemon.api("PUT", f"/domains/{DOMAIN}/outbound", {"tier": "unlimited"})
    assert status == 200, body
    await mark_ses_verified(db_path, DOMAIN)


async def api_sent_today(daemon: DaemonProcess) -> int:
    status, body = await daemon.api("GET", f"/domains/{DOMAIN}/outbound")
    assert status == 200, body
    return int(body["sent_today"])


async def ask(daemon: DaemonProcess, times: int) -> list[bytes]:
    """Send times outbound requests on one connection; the replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.policy_port)
    try:
        replies = []
        for _ in range(times):
            writer.write(request_bytes(**outbound(f"user@{DOMAIN}")))
            replies.append(await asyncio.wait_for(reader.readuntil(b"\n\n"), 10))
        return replies
    finally:
        writer.close()


def check_standalone_copy(copy: Path, live: Path) -> None:
    """A whole database on its own: intact, rollback-journal mode, no side files, no wider
    permissions than the live file."""
    conn = sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        conn.close()
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith(copy.name)] == [
        copy.name]
    assert stat.S_IMODE(copy.stat().st_mode) == stat.S_IMODE(live.stat().st_mode)


@pytest.mark.slow
async def test_backup_under_load_is_a_consistent_copy_that_restores(tmp_path: Path) -> None:
    db_path = tmp_path / "policyd.sqlite3"
    config = daemon_config(tmp_path, db_path)
    dest = tmp_path / "backups" / "policyd-copy.sqlite3"
    dest.parent.mkdir()

    async with serving(config) as daemon:
        await seed(daemon, db_path)
        load = Load(daemon.policy_port)
        load.start()
        await load.reach(BEFORE_BACKUP)
        before = load.dunno
        code, out, err = await run_cli("backup", "--config", str(config), str(dest))
        by_end = load.dunno
        await load.stop()
        assert (code, out) == (0, f"{dest}\n"), err
        assert load.other == []
        assert await api_sent_today(daemon) == load.dunno  # every DUNNO counted, once
        copied = sent_today(dest, DOMAIN)
        assert before <= copied <= by_end + CLIENTS, (before, copied, by_end)
        # mail after the backup, which the restore must take back
        assert await ask(daemon, 5) == [b"action=DUNNO\n\n"] * 5
        assert await api_sent_today(daemon) == load.dunno + 5
        assert await daemon.stop() == 0
    check_standalone_copy(dest, db_path)

    # The restore, as the README says: daemon stopped, WAL and shared memory removed, the
    # copy in place of the database, daemon started.
    for suffix in SIDE_FILES:
        db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(dest, db_path)
    async with serving(config) as daemon:
        status, health = await daemon.api("GET", "/health")
        assert (status, health["status"], health["db"]) == (200, "ok", "ok")
        assert await api_sent_today(daemon) == copied
        assert await ask(daemon, 1) == [b"action=DUNNO\n\n"]
        assert await api_sent_today(daemon) == copied + 1
        assert await daemon.stop() == 0


@pytest.fixture
async def database(tmp_path: Path) -> tuple[Path, Path]:
    """A config and its database, created by `policyd init-db`."""
    db_path = tmp_path / "db" / "policyd.sqlite3"
    config = daemon_config(tmp_path, db_path)
    code, _, err = await run_cli("init-db", "--config", str(config))
    assert code == 0, err
    return config, db_path


@pytest.mark.parametrize("dest", ["policyd.sqlite3", "policyd.sqlite3-wal", "link.sqlite3"])
async def test_backup_refuses_to_write_over_the_live_database(
        database: tuple[Path, Path], dest: str) -> None:
    config, db_path = database
    (db_path.parent / "link.sqlite3").symlink_to(db_path)
    before = db_path.read_bytes()

    code, out, err = await run_cli("backup", "--config", str(config), str(db_path.parent / dest))

    assert code == 1 and out == ""
    named = (db_path.parent / dest).resolve()
    assert err.splitlines() == [
        f"policyd: backup: {named} is the live database: give another destination"]
    assert db_path.read_bytes() == before
    assert sorted(p.name for p in db_path.parent.iterdir() if p.name.startswith(".")) == []


async def test_backup_into_a_directory_writes_a_dated_file(
        database: tuple[Path, Path], tmp_path: Path) -> None:
    config, db_path = database
    target_dir = tmp_path / "backups"
    target_dir.mkdir()

    code, out, err = await run_cli("backup", "--config", str(config), str(target_dir))

    assert code == 0, err
    written = Path(out.strip())
    assert written.parent == target_dir and written.name.startswith("policyd-")
    assert written.suffix == ".sqlite3"
    check_standalone_copy(written, db_path)


async def test_backup_replaces_an_older_copy_and_its_stale_side_files(
        database: tuple[Path, Path], tmp_path: Path) -> None:
    config, db_path = database
    dest = tmp_path / "copy.sqlite3"
    dest.write_bytes(b"an older, broken copy")
    stale = dest.with_name(dest.name + "-journal")
    stale.write_bytes(b"a hot journal of the older copy")

    code, out, err = await run_cli("backup", "--config", str(config), str(dest))

    assert (code, out) == (0, f"{dest}\n"), err
    assert not stale.exists()
    check_standalone_copy(dest, db_path)
