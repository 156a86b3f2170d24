"""GET /health and /metrics report Litestream's last successful sync ([replication]).

Litestream's control socket is played by a small aiohttp server on a Unix socket that answers
`GET /list` as Litestream 0.5 does (server.go: {"databases": [{"path", "status",
"last_sync_at"}]}); tests/test_litestream.py runs the daemon against the real one.
"""
from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web

from policyd.config import Config
from tests.conftest import Daemon, start_daemon

WAIT = 10.0  # deadline for the monitor's next look (it looks every 0.05 s here)


class FakeLitestream:
    """`GET /list` on a Unix socket, answering whatever `databases` is set to."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.databases: list[dict[str, Any]] = []
        self.asked = 0
        self._runner: web.AppRunner | None = None

    async def _list(self, request: web.Request) -> web.Response:
        self.asked += 1
        return web.json_response({"databases": self.databases})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/list", self._list)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket)).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def go_time(moment: datetime) -> str:
    """A time as Litestream writes it (Go's RFC 3339 with nanoseconds)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


@pytest.fixture
async def litestream(tmp_path: Path) -> AsyncIterator[FakeLitestream]:
    fake = FakeLitestream(tmp_path / "litestream.sock")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def watched(make_config: Callable[..., Config],
                  litestream: FakeLitestream) -> AsyncIterator[Daemon]:
    config = make_config(replication={"control_socket": str(litestream.socket),
                                      "poll_interval": "0.05", "max_lag": "30"})
    daemon = await start_daemon(config)
    yield daemon
    await daemon.stop()


async def replication_once(daemon: Daemon, pred: Callable[[dict[str, Any]], bool]
                           ) -> dict[str, Any]:
    """The /health `replication` field, once pred holds for it (or fail at the deadline)."""
    async with asyncio.timeout(WAIT):
        while True:
            status, body = await daemon.api("GET", "/health", token=None)
            assert status == 200, body
            if pred(body["replication"]):
                return body["replication"]
            await asyncio.sleep(0.02)


def our_entry(daemon: Daemon, last_sync_at: datetime | None,
              status: str = "replicating") -> dict[str, Any]:
    entry: dict[str, Any] = {"path": os.path.realpath(daemon.rt.config.db_path),
                             "status": status}
    if last_sync_at is not None:
        entry["last_sync_at"] = go_time(last_sync_at)
    return entry


async def metric(daemon: Daemon, name: str) -> float:
    status, text = await daemon.api("GET", "/metrics")
    assert status == 200
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


async def test_health_reports_a_replicating_database_and_its_last_sync(
        watched: Daemon, litestream: FakeLitestream) -> None:
    synced = datetime.now(timezone.utc).replace(microsecond=500000)
    litestream.databases = [{"path": "/elsewhere/other.sqlite3", "status": "replicating",
                             "last_sync_at": go_time(synced - timedelta(hours=1))},
                            our_entry(watched, synced)]
    seen = await replication_once(watched, lambda r: r["status"] == "replicating")
    assert seen["ok"] is True
    assert seen["last_sync_at"] == synced.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert 0 <= seen["lag_seconds"] <= 30
    assert await metric(watched, "policyd_replication_up") == 1
    assert await metric(watched, "policyd_replication_last_sync_timestamp_seconds") == \
        pytest.approx(synced.timestamp() + 123e-9, abs=1e-6)
    assert 0 <= await metric(watched, "policyd_replication_lag_seconds") <= 30


async def test_a_stale_replica_is_not_ok_and_is_logged_once(
        watched: Daemon, litestream: FakeLitestream, caplog: pytest.LogCaptureFixture) -> None:
    litestream.databases = [our_entry(watched, datetime.now(timezone.utc))]
    await replication_once(watched, lambda r: r["ok"])
    stale = datetime.now(timezone.utc) - timedelta(seconds=120)
    with caplog.at_level(logging.WARNING, logger="policyd.replication"):
        litestream.databases = [our_entry(watched, stale)]
        seen = await replication_once(watched, lambda r: not r["ok"])
        asked = litestream.asked
        async with asyncio.timeout(WAIT):  # a few more looks, still stale: no more lines
            while litestream.asked < asked + 3:
                await asyncio.sleep(0.02)
    assert seen["status"] == "replicating" and seen["lag_seconds"] >= 120
    warnings = [r.getMessage() for r in caplog.records if r.name == "policyd.replication"]
    assert len(warnings) == 1 and "max_lag = 30 s" in warnings[0]
    assert await metric(watched, "policyd_replication_lag_seconds") >= 120


async def test_a_database_litestream_does_not_replicate_is_not_ok(
        watched: Daemon, litestream: FakeLitestream) -> None:
    litestream.databases = [{"path": "/elsewhere/other.sqlite3", "status": "replicating",
                             "last_sync_at": go_time(datetime.now(timezone.utc))}]
    seen = await replication_once(watched, lambda r: r["status"] == "not_listed")
    assert seen == {**seen, "ok": False, "last_sync_at": None, "lag_seconds": None}
    litestream.databases = [our_entry(watched, None, status="stopped")]
    seen = await replication_once(watched, lambda r: r["status"] == "stopped")
    assert seen["ok"] is False
    assert await metric(watched, "policyd_replication_up") == 0


async def test_litestream_gone_keeps_the_last_sync_and_lets_the_lag_grow(
        watched: Daemon, litestream: FakeLitestream) -> None:
    synced = datetime.now(timezone.utc) - timedelta(seconds=5)
    litestream.databases = [our_entry(watched, synced)]
    before = await replication_once(watched, lambda r: r["status"] == "replicating")
    await litestream.stop()
    seen = await replication_once(watched, lambda r: r["status"] == "unreachable")
    assert seen["last_sync_at"] == before["last_sync_at"]
    assert seen["lag_seconds"] >= before["lag_seconds"]
    assert seen["ok"] is False
    assert await metric(watched, "policyd_replication_up") == 0


async def test_health_has_no_replication_field_unless_watched(daemon: Daemon) -> None:
    status, body = await daemon.api("GET", "/health", token=None)
    assert status == 200 and "replication" not in body
    status, text = await daemon.api("GET", "/metrics")
    assert "policyd_replication" not in text


def test_an_overdue_look_counts_as_no_answer() -> None:
    """If the looks stop (the watcher stuck or dead), the lag grows from the last sync known
    instead of staying what the last answer said."""
    from prometheus_client import CollectorRegistry

    from policyd.config import ReplicationConfig
    from policyd.replication import ReplicationMonitor, Seen

    clock = [datetime(2026, 11, 24, 12, 0, 0, tzinfo=timezone.utc)]
    monitor = ReplicationMonitor(ReplicationConfig("/nonexistent.sock", 5.0, 30.0),
                                 Path("db.sqlite3"), CollectorRegistry(), now=lambda: clock[0])
    synced = clock[0] - timedelta(seconds=1)
    monitor.record(Seen("replicating", synced, clock[0]))
    clock[0] += timedelta(seconds=10)  # within 2 looks (+ the answer's timeout): as answered
    assert monitor.lag() == 1.0 and monitor.ok()
    clock[0] += timedelta(seconds=60)  # no look for over a minute
    assert monitor.lag() == 71.0 and not monitor.ok()
    assert monitor.health()["lag_seconds"] == 71.0
